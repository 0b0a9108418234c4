"""Models straight from any checkpoint format (for inference, tests and `init_from`).

    model = converters.loaders.jax_model("jax:/ckpt/run/checkpoints")      # Flax MUG-DiT
    model = converters.loaders.megatron_model("megatron:/ckpt/mcore")      # megatron.core MUG-DiT
    config, params = converters.loaders.jax_params("jax:/ckpt@1000")       # Trainer.init_state(seed, params)

Each reads the checkpoint through the converters (strict schema check first), so the whole model
is in memory once, as the model itself needs.
"""
from __future__ import annotations

import numpy as np

from converters.convert import open_checked
from converters.formats import parse_spec
from mugv.io.base import to_torch
from mugv.schema import release_schema


def _jax_spec(spec):
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.format not in (None, "jax"):
        raise ValueError(f"{spec}: expected a JAX checkpoint")
    return spec


def jax_params(spec, *, weights: str = "raw"):
    """(config, nested float32 params dict) of a JAX checkpoint."""
    from converters.formats.jax import load_params
    spec = _jax_spec(spec)
    return load_params(spec.path, spec.number, weights)


def jax_model(spec, *, weights: str = "raw", options=None):
    """The Flax MUG-DiT with the weights of a JAX (orbax) checkpoint."""
    from converters.formats.jax import load_model
    spec = _jax_spec(spec)
    return load_model(spec.path, spec.number, weights, options)


def release_state(spec, *, model=None) -> dict[str, np.ndarray]:
    """Any checkpoint as a release-layout {name: array} (whole model in memory), release order."""
    reader, config, _ = open_checked(spec, model=model)
    with reader:
        state = dict(reader.items())
    return {name: state[name] for name in release_schema(config)}


def megatron_model(spec, *, model=None, params_dtype=None):
    """The megatron.core MUG-DiT (this process's TP rank) with the weights of any checkpoint."""
    import torch
    from mugv_megatron import dit
    reader, config, _ = open_checked(spec, model=model)
    with reader:
        state = {name: to_torch(array) for name, array in reader.items()}
        m = dit.build_model(config, params_dtype=params_dtype or torch.float32,
                            perform_initialization=False)
        dit.load_release_state(m, state, source=reader.path)
    return m.eval()
