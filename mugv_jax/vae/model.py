"""`VideoVAE`: the released MUG-V video VAE (`MUGAutoencoderPipeline`) as one Flax NNX module.

It owns the parameters (module paths = release state-dict names, see checkpoint.py) and runs the
orchestration of `pipeline.Pipeline` traceably: every method can be called eagerly or inside a
user's `nnx.jit` with static shapes (the plans depend on shapes only). Runs of same-shaped
network calls (2D micro-batches, temporal-encode chunks, equal decode windows) trace under
`jax.lax.map`, so a compiled graph holds one copy of each network and peak memory stays that of
one chunk, as in the release. For many clip lengths prefer `mugv_jax.vae.jit(model)`, which
compiles per network chunk instead of per whole call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mugv.vae_config import RELEASE_LATENT_SCALE, RELEASE_LATENT_SHIFT, VAEConfig, get_vae_config
from mugv_jax.vae.layers import F32, Buffer
from mugv_jax.vae.orchestration import Pipeline
from mugv_jax.vae.spatial import SpatialVAE
from mugv_jax.vae.temporal import TemporalVAE

# Which submodule method implements each network of the pipeline.
NETWORK_METHODS = {
    "encode_frames": ("spatial_vae", "encode_frames"),
    "decode_frames": ("spatial_vae", "decode_frames"),
    "encode_groups": ("temporal_vae", "encode_groups"),
    "decode_window": ("temporal_vae", "decode_window"),
}


class VideoVAE(nnx.Module, Pipeline):
    def __init__(self, config: VAEConfig | str, *, rngs: nnx.Rngs, compute_dtype=F32):
        config = get_vae_config(config)
        dtype = jnp.dtype(compute_dtype)
        self.config = config
        self.compute_dtype = dtype
        self.spatial_vae = SpatialVAE(config, dtype=dtype, rngs=rngs)
        self.temporal_vae = TemporalVAE(config, dtype=dtype, rngs=rngs)
        c = config.embed_dim
        # The release constructor's defaults; a checkpoint's buffers replace them on load.
        shift = RELEASE_LATENT_SHIFT if c == len(RELEASE_LATENT_SHIFT) else (0.0,) * c
        scale = RELEASE_LATENT_SCALE if c == len(RELEASE_LATENT_SCALE) else (1.0,) * c
        axes = (None, "channels", None, None, None)
        self.shift = Buffer(jnp.asarray(shift, F32).reshape(1, c, 1, 1, 1), logical_axes=axes)
        self.scale = Buffer(jnp.asarray(scale, F32).reshape(1, c, 1, 1, 1), logical_axes=axes)
        # A training leftover of the release (never read by encode/decode).
        self.logvar = nnx.Param(jnp.full((), 4.0, F32), logical_axes=())

    def _latent_buffers(self):
        return self.shift[...], self.scale[...]

    def _run(self, network, inputs):
        part, method = NETWORK_METHODS[network]
        fn = getattr(getattr(self, part), method)
        if len(inputs) == 1:
            return [fn(inputs[0])]
        stacked = jax.lax.map(fn, jnp.stack(inputs))
        return [stacked[i] for i in range(len(inputs))]
