"""The release's encode/decode orchestration (`MUGAutoencoderPipeline`) over four networks.

encode: per-frame 2D encode (×0.18215) → independent 8-frame temporal-encode groups → posterior
(mean, logvar clamped to [−30, 20]) → mode or sample → (z − shift) / scale.
decode: z·scale + shift → temporal decode in windows, each cropped at the front → ÷0.18215 and
per-frame 2D decode.

The orchestration is written once, here, against four networks with static-shape inputs:

    encode_frames  [N, H, W, 3]       → [N, h, w, C]        (2D encoder × 0.18215)
    decode_frames  [N, h, w, C]       → [N, H, W, 3]        (÷ 0.18215, 2D decoder)
    encode_groups  [N, 8, h, w, C]    → [N, h, w, 2E]       (temporal encoder + quant_conv)
    decode_window  [B, n, h, w, E]    → [B, 8n, h, w, C]    (post_quant_conv + temporal decoder)

A subclass decides how a *sequence* of same-shaped network calls runs (`_run`): the NNX model
traces them under `jax.lax.map` (one network copy per compiled graph), `JittedVAE` calls one
compiled network per chunk from Python (one compile per chunk shape, reused across clip lengths).
Public tensors use the release layout [B, C, T, H, W]; networks see channels-last.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mugv.vae_config import TEMPORAL_GROUP, VAEConfig
from mugv_jax.vae.layers import F32
from mugv_jax.vae.windows import ZERO, decode_windows, encode_calls

NETWORKS = ("encode_frames", "decode_frames", "encode_groups", "decode_window")


def _to_frames(x: jax.Array) -> jax.Array:
    """[B, C, T, H, W] → [B·T, H, W, C], batch-major like the release's rearrange."""
    b, c, t, h, w = x.shape
    return jnp.moveaxis(x, 1, -1).reshape(b * t, h, w, c)


def _from_frames(frames: jax.Array, b: int) -> jax.Array:
    """[B·T, H, W, C] → [B, C, T, H, W]."""
    return jnp.moveaxis(frames.reshape(b, -1, *frames.shape[1:]), -1, 1)


class Pipeline:
    """Mixin: subclasses provide `config`, `compute_dtype`, `_run` and `_latent_buffers`."""

    config: VAEConfig
    compute_dtype: jnp.dtype

    def _run(self, network: str, inputs: list[jax.Array]) -> list[jax.Array]:
        """`network` applied to each of `inputs` (all the same shape), one after another."""
        raise NotImplementedError

    def _latent_buffers(self) -> tuple[jax.Array, jax.Array]:
        """(shift, scale), each [1, E, 1, 1, 1]."""
        raise NotImplementedError

    def _chunked(self, network: str, x: jax.Array, size: int | None) -> jax.Array:
        """`network` over the rows of x in chunks of `size`; rows must be independent.

        The last chunk is zero-padded to full size (the padding is dropped again), so every chunk
        has one shape; exact, because the networks never mix rows.
        """
        n = x.shape[0]
        if size is None or n <= size:
            return self._run(network, [x])[0]
        steps = -(-n // size)
        pad = steps * size - n
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)], axis=0)
        outs = self._run(network, [x[i * size : (i + 1) * size] for i in range(steps)])
        return jnp.concatenate(outs, axis=0)[:n]

    # --- 2D ---------------------------------------------------------------------------------------

    def spatial_encode(self, x: jax.Array) -> jax.Array:
        """Video [B, 3, T, H, W] → scaled 2D features [B, C, T, H/8, W/8], frame by frame."""
        frames = _to_frames(x).astype(self.compute_dtype)
        return _from_frames(self._chunked("encode_frames", frames, self.config.micro_batch_size), x.shape[0])

    def spatial_decode(self, features: jax.Array) -> jax.Array:
        """Scaled 2D features [B, C, T, h, w] → video [B, 3, T, 8h, 8w], frame by frame."""
        frames = _to_frames(features).astype(self.compute_dtype)
        return _from_frames(self._chunked("decode_frames", frames, self.config.micro_batch_size), features.shape[0])

    # --- temporal ---------------------------------------------------------------------------------

    def temporal_encode(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Scaled 2D features [B, C, T, h, w] → posterior (mean, clamped logvar), [B, E, T', h, w]."""
        cfg = self.config
        b, c, t, h, w = features.shape
        calls = encode_calls(t, cfg.micro_frame_size)
        slots = np.array([t if s == ZERO else s for call in calls for group in call for s in group])
        n_groups = len(slots) // TEMPORAL_GROUP
        ft = jnp.moveaxis(features, 1, -1).astype(self.compute_dtype)
        ft = jnp.concatenate([ft, jnp.zeros_like(ft[:, :1])], axis=1)  # index t: the zero frame
        groups = ft[:, slots].reshape(b * n_groups, TEMPORAL_GROUP, h, w, c)
        # Groups are independent batch elements: one chunk per release temporal-encode call.
        per_call = None if cfg.micro_frame_size is None else b * (cfg.micro_frame_size // TEMPORAL_GROUP)
        moments = self._chunked("encode_groups", groups, per_call)
        moments = jnp.moveaxis(moments.reshape(b, n_groups, h, w, -1), -1, 1)
        e = moments.shape[1] // 2
        return moments[:, :e], jnp.clip(moments[:, e:], cfg.logvar_min, cfg.logvar_max)

    def temporal_decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """De-normalised latents [B, E, L, h, w] → scaled 2D features [B, C, num_frames, h, w]."""
        zt = jnp.moveaxis(z, 1, -1).astype(self.compute_dtype)  # [B, L, h, w, E]
        windows = decode_windows(zt.shape[1], num_frames, self.config.micro_frame_size)
        outs = []
        # Consecutive windows of one length and crop form one sequence of same-shaped calls.
        for (_, crop), run in itertools.groupby(
            windows, key=lambda win: (win.latent_stop - win.latent_start, win.crop_front)
        ):
            decoded = self._run("decode_window", [zt[:, w.latent_start : w.latent_stop] for w in run])
            outs.extend(d[:, crop:] for d in decoded)
        return jnp.moveaxis(jnp.concatenate(outs, axis=1), -1, 1)

    # --- pipeline ---------------------------------------------------------------------------------

    def posterior(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Video [B, 3, T, H, W] in [−1, 1] → (mean, clamped logvar) [B, E, T', H/8, W/8]."""
        return self.temporal_encode(self.spatial_encode(x))

    def normalize(self, z: jax.Array) -> jax.Array:
        shift, scale = self._latent_buffers()
        return (z - shift.astype(z.dtype)) / scale.astype(z.dtype)

    def denormalize(self, z: jax.Array) -> jax.Array:
        shift, scale = self._latent_buffers()
        return z * scale.astype(z.dtype) + shift.astype(z.dtype)

    def latent(
        self,
        mean: jax.Array,
        logvar: jax.Array,
        sample: bool = False,
        noise: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Normalised latents from a posterior: the mode, or mean + exp(½·logvar)·ε when sampling.

        ε is `noise` (the latents' shape) or drawn from `key`. The release samples.
        """
        if not sample:
            if noise is not None or key is not None:
                raise ValueError("got noise/key with sample=False; pass sample=True to sample")
            return self.normalize(mean)
        if noise is None:
            if key is None:
                raise ValueError("sample=True needs `noise` or a PRNG `key`")
            noise = jax.random.normal(key, mean.shape, F32)
        if tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, the latents have {tuple(mean.shape)}")
        return self.normalize(mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype))

    def encode(
        self, x: jax.Array, sample: bool = False, noise: jax.Array | None = None, key: jax.Array | None = None
    ) -> jax.Array:
        """Video [B, 3, T, H, W] in [−1, 1] → normalised latents [B, E, T', H/8, W/8] (see `latent`)."""
        mean, logvar = self.posterior(x)
        return self.latent(mean, logvar, sample, noise, key)

    def encode_image(
        self, image: jax.Array, sample: bool = False, noise: jax.Array | None = None, key: jax.Array | None = None
    ) -> jax.Array:
        """The image-to-video reference latent: `encode` of the image [B, 3, 1, H, W] repeated 8×."""
        if image.ndim != 5 or image.shape[2] != 1:
            raise ValueError(f"encode_image expects [B, 3, 1, H, W], got {tuple(image.shape)}")
        return self.encode(jnp.repeat(image, TEMPORAL_GROUP, axis=2), sample, noise, key)

    def decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """Normalised latents [B, E, L, h, w] → video [B, 3, num_frames, 8h, 8w] (no clamp).

        Image-to-video as released: decode(z[:, :, 1:], T − 1), then prepend the reference image.
        """
        return self.spatial_decode(self.temporal_decode(self.denormalize(z), num_frames))
