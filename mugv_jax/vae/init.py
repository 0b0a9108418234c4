"""Fast random initialisation of a `VideoVAE` in numpy (no XLA compile).

The NNX constructor draws every weight with its own jax.random op: eagerly that is one compile
per distinct shape, under `nnx.jit` one very large compile (~10 min for the release config on
a loaded 2-core CPU). For benchmarks, tests and fresh training runs the exact stream does not
matter, so this builds the model abstractly and fills the same distributions from numpy:
weights N(0, 1/fan_in) like `layers._normal_param`, biases 0, norm scales 1, buffers and
`logvar` at the constructor's values.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mugv.vae_config import RELEASE_LATENT_SCALE, RELEASE_LATENT_SHIFT, VAEConfig, get_vae_config
from mugv_jax.vae.model import VideoVAE


def random_vae(config: VAEConfig | str, seed: int = 0, compute_dtype=jnp.float32) -> VideoVAE:
    config = get_vae_config(config)
    abstract = nnx.eval_shape(lambda: VideoVAE(config, rngs=nnx.Rngs(0), compute_dtype=compute_dtype))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    c = config.embed_dim
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        if name == "shift":
            v = np.asarray(RELEASE_LATENT_SHIFT if c == len(RELEASE_LATENT_SHIFT) else (0.0,) * c)
        elif name == "scale":
            v = np.asarray(RELEASE_LATENT_SCALE if c == len(RELEASE_LATENT_SCALE) else (1.0,) * c)
        elif name == "logvar":
            v = np.full(shape, 4.0)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            v = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(fan_in)
        elif name.endswith("bias"):
            v = np.zeros(shape)
        else:  # GroupNorm scale
            v = np.ones(shape)
        var.set_value(jnp.asarray(np.asarray(v, np.float32).reshape(shape)))
    return nnx.merge(graphdef, state)
