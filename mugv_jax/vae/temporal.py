"""The 3D "temporal" autoencoder (`MUGVAETemporal`): 8 feature frames ↔ 1 latent frame.

Activations are channels-last [N, T, h, w, C]; the spatial size never changes here. GroupNorm
statistics cover (C/G, T, h, w) of each batch element, so the encoder normalises one 8-frame group
at a time and the decoder a whole decode window: windowing changes decode results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mugv.vae_config import DECODER_TEMPORAL_UPSAMPLE, VAEConfig
from mugv_jax.vae.layers import CausalConv3d, GroupNorm, silu


def _norm(cfg: VAEConfig, c: int, dtype) -> GroupNorm:
    return GroupNorm(cfg.temporal_num_groups, c, cfg.temporal_norm_eps, dtype=dtype)


class ResBlock(nnx.Module):
    """GN → SiLU → conv → GN → SiLU → conv (no biases) plus a 1×1×1 `conv3` shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, dtype, rngs):
        self.norm1 = _norm(cfg, cin, dtype)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = _norm(cfg, cout, dtype)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False, dtype=dtype, rngs=rngs)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False, dtype=dtype, rngs=rngs) if cin != cout else None

    def body(self, x):
        return self.conv2(silu(self.norm2(self.conv1(silu(self.norm1(x))))))

    def __call__(self, x):
        residual = x if self.conv3 is None else self.conv3(x)
        return self.body(x) + residual


class TimeUpsampleBlock(ResBlock):
    """`decoder.upsample_block`: repeat every frame twice (nearest ×2 in T), then a same-width ResBlock."""

    def __call__(self, x):
        x = jnp.repeat(x, 2, axis=1)
        return self.body(x) + x


def _depth_to_time(x: jax.Array) -> jax.Array:
    """[N, T, h, w, 2C] → [N, 2T, h, w, C]; channel c·2+k becomes channel c at time 2t+k."""
    n, t, h, w, c2 = x.shape
    x = x.reshape(n, t, h, w, c2 // 2, 2)
    return jnp.moveaxis(x, 5, 2).reshape(n, 2 * t, h, w, c2 // 2)


class TemporalEncoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        widths = cfg.temporal_widths
        self.conv_in = CausalConv3d(cfg.temporal_in_out_channels, cfg.filters, 3, bias=False, dtype=dtype, rngs=rngs)
        blocks, cin = [], cfg.filters
        for cout in widths:
            blocks.append(
                nnx.List(
                    [
                        ResBlock(cin if j == 0 else cout, cout, cfg, dtype=dtype, rngs=rngs)
                        for j in range(cfg.num_res_blocks)
                    ]
                )
            )
            cin = cout
        self.block_res_blocks = nnx.List(blocks)
        self.conv_blocks = nnx.List(
            [CausalConv3d(c, c, 3, bias=True, time_stride=2, dtype=dtype, rngs=rngs) for c in widths[:-1]]
        )
        self.res_blocks = nnx.List(
            [ResBlock(widths[-1], widths[-1], cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_res_blocks)]
        )
        self.norm1 = _norm(cfg, widths[-1], dtype)
        self.conv2 = CausalConv3d(widths[-1], 2 * cfg.latent_embed_dim, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        """[N, 8, h, w, C_in] → [N, 1, h, w, 2·latent_embed_dim]."""
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for b in blocks:
                x = b(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for b in self.res_blocks:
            x = b(x)
        return self.conv2(silu(self.norm1(x)))


class TemporalDecoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        widths = cfg.temporal_widths
        top = widths[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, top, 3, bias=True, dtype=dtype, rngs=rngs)
        self.res_blocks = nnx.List([ResBlock(top, top, cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_res_blocks)])
        self.upsample_block = TimeUpsampleBlock(top, top, cfg, dtype=dtype, rngs=rngs)
        blocks = []
        for i, cout in enumerate(widths):
            cin = widths[i + 1] if i + 1 < len(widths) else top
            blocks.append(
                nnx.List(
                    [
                        ResBlock(cin if j == 0 else cout, cout, cfg, dtype=dtype, rngs=rngs)
                        for j in range(cfg.num_res_blocks)
                    ]
                )
            )
        self.block_res_blocks = nnx.List(blocks)
        # Identity (None) where the release's hard-wired flag is False: no keys, no time change.
        self.conv_blocks = nnx.List(
            [
                CausalConv3d(widths[i + 1], 2 * widths[i + 1], 3, bias=True, dtype=dtype, rngs=rngs) if up else None
                for i, up in enumerate(DECODER_TEMPORAL_UPSAMPLE)
            ]
        )
        self.norm1 = _norm(cfg, widths[0], dtype)
        self.conv_out = CausalConv3d(widths[0], cfg.temporal_in_out_channels, 3, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, z):
        """[N, n, h, w, latent_embed_dim] → [N, 8n, h, w, C_out] (before any front crop)."""
        x = self.conv1(z)
        for b in self.res_blocks:
            x = b(x)
        x = self.upsample_block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for b in self.block_res_blocks[i]:
                x = b(x)
            if i > 0 and self.conv_blocks[i - 1] is not None:
                x = _depth_to_time(self.conv_blocks[i - 1](x))
        return self.conv_out(silu(self.norm1(x)))


class TemporalVAE(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        self.encoder = TemporalEncoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = CausalConv3d(
            2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1, bias=True, dtype=dtype, rngs=rngs
        )
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1, bias=True, dtype=dtype, rngs=rngs)
        self.decoder = TemporalDecoder(cfg, dtype=dtype, rngs=rngs)

    def encode_groups(self, groups: jax.Array) -> jax.Array:
        """Independent 8-frame groups [N, 8, h, w, C] → moments [N, h, w, 2·embed_dim]."""
        return self.quant_conv(self.encoder(groups))[:, 0]

    def decode_window(self, z: jax.Array) -> jax.Array:
        """One decode window of latents [N, n, h, w, embed_dim] → [N, 8n, h, w, C] (uncropped)."""
        return self.decoder(self.post_quant_conv(z))
