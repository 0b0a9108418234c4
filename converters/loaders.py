"""Models and state dicts straight from any checkpoint format (for inference, tests and `init_from`).

    model = converters.loaders.megatron_model("megatron:/ckpt/mcore")      # megatron.core MUG-DiT
    state = converters.loaders.release_state("jax:/ckpt@1000")             # {release name: array}

Each reads the checkpoint through the converters' readers (the core's `mugv.io` readers, plus
legacy Megatron files; strict schema check first), so the whole model is in memory once, as the
model itself needs. The trainers' `init_from` reads through `mugv.io.weights.open_weights`; a
Flax model or params from a JAX checkpoint come from `mugv_jax.dit.checkpoint.load_trainer_checkpoint`
/ `mugv.io.weights.load_params`.
"""

from __future__ import annotations

import numpy as np

from converters.convert import open_checked
from mugv.io.base import to_torch
from mugv.schema import release_schema


def release_state(spec, *, model=None, weights: str = "raw") -> dict[str, np.ndarray]:
    """Any checkpoint as a release-layout {name: array} (whole model in memory), release order;
    `weights="ema"` takes a training checkpoint's EMA."""
    reader, config, _ = open_checked(spec, model=model, weights=weights)
    with reader:
        state = reader.read_all()
    return {name: state[name] for name in release_schema(config)}


def megatron_model(spec, *, model=None, params_dtype=None):
    """The megatron.core MUG-DiT (this process's TP rank) with the weights of any checkpoint."""
    import torch

    from mugv_megatron.model import build as dit

    reader, config, _ = open_checked(spec, model=model)
    with reader:
        state = {name: to_torch(array) for name, array in reader.items()}
        m = dit.build_model(config, params_dtype=params_dtype or torch.float32, perform_initialization=False)
        dit.load_release_state(m, state, source=reader.path)
    return m.eval()
