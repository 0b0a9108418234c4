"""The per-frame 2D VAE: a diffusers `AutoencoderKL` (SDXL layout) as the release *runs* it.

Encode stops after the mid-block (conv_norm_out / conv_out exist but are never applied); decode
starts at the mid-block (conv_in is never applied). Those unused layers are still built, because
the release checkpoint holds them and a strict load needs a home for every tensor.
Attribute names follow diffusers so parameter paths equal release names. Input and output
frames are channels-last [N, H, W, C].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mugv.vae_config import VAEConfig
from mugv_jax.vae.layers import F32, HIGHEST, GroupNorm, Linear, conv2d, silu


class ResnetBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, dtype, rngs):
        g, eps = cfg.norm_num_groups, cfg.spatial_norm_eps
        self.norm1 = GroupNorm(g, cin, eps, dtype=dtype)
        self.conv1 = conv2d(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(g, cout, eps, dtype=dtype)
        self.conv2 = conv2d(cout, cout, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = conv2d(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """Single-head self-attention over the h·w positions of one frame, with a residual."""

    def __init__(self, c: int, cfg: VAEConfig, *, dtype, rngs):
        self.group_norm = GroupNorm(cfg.norm_num_groups, c, cfg.spatial_norm_eps, dtype=dtype)
        self.to_q = Linear(c, c, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.to_k = Linear(c, c, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.to_v = Linear(c, c, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(c, c, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)])
        self.dtype = dtype

    def __call__(self, x):
        n, h, w, c = x.shape
        t = self.group_norm(x).reshape(n, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        scores = jnp.einsum("nqc,nkc->nqk", q, k, precision=HIGHEST, preferred_element_type=F32)
        # diffusers upcasts the softmax to float32.
        probs = jax.nn.softmax(scores * (c**-0.5), axis=-1).astype(self.dtype)
        o = jnp.einsum("nqk,nkc->nqc", probs, v, precision=HIGHEST, preferred_element_type=F32).astype(self.dtype)
        return x + self.to_out[0](o).reshape(n, h, w, c)


class MidBlock2D(nnx.Module):
    def __init__(self, c: int, cfg: VAEConfig, *, dtype, rngs):
        self.attentions = nnx.List([Attention(c, cfg, dtype=dtype, rngs=rngs)])
        self.resnets = nnx.List([ResnetBlock2D(c, c, cfg, dtype=dtype, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample2D(nnx.Module):
    """Zero pad right/bottom by one, then a valid stride-2 3×3 conv: size ⌊n/2⌋."""

    def __init__(self, c: int, *, dtype, rngs):
        self.conv = conv2d(c, c, 3, stride=2, padding=(0, 1), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest ×2, then a 3×3 conv."""

    def __init__(self, c: int, *, dtype, rngs):
        self.conv = conv2d(c, c, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, downsample: bool, dtype, rngs):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(cin if j == 0 else cout, cout, cfg, dtype=dtype, rngs=rngs)
                for j in range(cfg.layers_per_block)
            ]
        )
        self.downsamplers = nnx.List([Downsample2D(cout, dtype=dtype, rngs=rngs)]) if downsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, upsample: bool, dtype, rngs):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(cin if j == 0 else cout, cout, cfg, dtype=dtype, rngs=rngs)
                for j in range(cfg.layers_per_block + 1)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)]) if upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder2D(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        ch = cfg.block_out_channels
        self.conv_in = conv2d(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg, downsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock2D(ch[-1], cfg, dtype=dtype, rngs=rngs)
        # Never applied (the release returns the mid-block output); kept for the strict load.
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], cfg.spatial_norm_eps, dtype=dtype)
        self.conv_out = conv2d(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.mid_block(x)


class Decoder2D(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        rev = cfg.block_out_channels[::-1]
        # Never applied (decode enters at the mid-block); kept for the strict load.
        self.conv_in = conv2d(cfg.latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg, upsample=i < len(rev) - 1, dtype=dtype, rngs=rngs)
                for i in range(len(rev))
            ]
        )
        self.mid_block = MidBlock2D(rev[0], cfg, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, rev[-1], cfg.spatial_norm_eps, dtype=dtype)
        self.conv_out = conv2d(rev[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.mid_block(x)
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class AutoencoderKL2D(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        self.encoder = Encoder2D(cfg, dtype=dtype, rngs=rngs)
        self.decoder = Decoder2D(cfg, dtype=dtype, rngs=rngs)


class SpatialVAE(nnx.Module):
    """`MUGAutoencoderKL`: holds the 2D autoencoder under `module` (the release's key prefix)."""

    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        self.module = AutoencoderKL2D(cfg, dtype=dtype, rngs=rngs)
        self.scaling_factor = cfg.scaling_factor

    def encode_frames(self, frames: jax.Array) -> jax.Array:
        """[N, H, W, 3] → mid-block features × scaling_factor, [N, H/8, W/8, C]."""
        return self.module.encoder(frames) * self.scaling_factor

    def decode_frames(self, features: jax.Array) -> jax.Array:
        """Scaled features [N, h, w, C] → frames [N, 8h, 8w, 3] (no clamp, like the release)."""
        return self.module.decoder(features / self.scaling_factor)
