"""A run's starting weights from a checkpoint: what both trainers' `config.init_from` reads
(`config.init_weights`: "raw" or "ema"), named as everywhere (mugv/io/spec.py).

    state = open_weights("megatron:/runs/a/checkpoints", model=config, weights="ema")
    config, params = load_params("jax:runs/x/checkpoints@1000")   # Trainer.init_state(seed, params)

    FILE (or release:FILE)  dit.pt, *.safetensors, a shard folder or its index json
    jax:DIR[@STEP]          an orbax checkpoint of the JAX trainer: state/params, or state/ema
    megatron:DIR[@ITER]     a torch_dist checkpoint (the Megatron trainer's, or a converters
                            output): the weights, or the trainer's EMA

A directory named without a prefix is recognised as a JAX or Megatron checkpoint. Names and
shapes are checked strictly against `release_schema(model)` before a tensor is read; the error
names the checkpoint and every missing, unexpected or mis-shaped tensor. Legacy per-rank
Megatron files (`mp_rank_*`) are converted first (`python -m converters convert`).

The whole model ends up in memory, as the model that takes it needs: release and torch_dist
tensors are views of the memory-mapped files where their layout allows, JAX arrays are read one
array at a time. Stored dtypes are kept.
"""

from __future__ import annotations

import os

import numpy as np

from mugv.config import DiTConfig, get_config
from mugv.io import spec as spec_lib
from mugv.io.orbax import StoredParams
from mugv.layouts.jax import unflatten
from mugv.schema import check_state_dict_shapes, release_schema


def open_weights(spec: str, *, model: DiTConfig | str, weights: str = "raw") -> dict[str, np.ndarray]:
    """{release name: array} of `spec` for a run of `model` (release order), the training
    checkpoint's EMA with `weights="ema"`."""
    if weights not in ("raw", "ema"):
        raise ValueError(f"config.init_weights must be 'raw' or 'ema', got {weights!r}")
    model = get_config(model)
    found = _resolve(spec)
    if found.format == "release" and weights == "ema":
        raise ValueError(
            f"config.init_from={spec} is a release checkpoint, which holds one set of "
            f"weights: config.init_weights='ema' needs a training checkpoint with an EMA "
            f"(jax:DIR[@STEP] or megatron:DIR[@ITER]); use config.init_weights='raw'"
        )
    if found.format == "megatron-legacy":
        raise ValueError(
            f"config.init_from={spec} is a legacy Megatron checkpoint (mp_rank_* files); "
            f"init_from reads torch_dist. Convert it first: python -m converters convert "
            f"--src megatron-legacy:{found.path} --dst release:OUT.safetensors"
        )
    schema = release_schema(model)
    with spec_lib.open_reader(found, weights=weights) as reader:
        check_state_dict_shapes({n: e.shape for n, e in reader.entries().items()}, schema, reader.location)
        # The per-head regroup of Megatron tensors follows the run's model.
        reader.layout_config = model
        state = reader.read_all()
    check_state_dict_shapes({n: a.shape for n, a in state.items()}, schema, spec)
    return {name: state[name] for name in schema}


def _resolve(spec: str) -> spec_lib.Spec:
    given = spec_lib.parse_spec(spec)
    if not os.path.exists(given.path):
        raise FileNotFoundError(f"config.init_from={spec}: {given.path} does not exist")
    return spec_lib.resolve(given)


def _stored_params(spec: str, weights: str) -> StoredParams:
    found = spec_lib.resolve(spec)
    if found.format != "jax":
        raise ValueError(f"{spec} is a {found.format} checkpoint; JAX params are read from jax:DIR[@STEP]")
    return StoredParams(found.path, found.number, weights)


def load_flat_params(spec: str, *, weights: str = "raw") -> tuple[DiTConfig, dict[str, np.ndarray]]:
    """(config, {JAX path: float32 array}) of `jax:PATH[@STEP]`."""
    stored = _stored_params(spec, weights)
    return stored.config, stored.read_flat()


def load_params(spec: str, *, weights: str = "raw") -> tuple[DiTConfig, dict]:
    """(config, nested float32 params dict) of `jax:PATH[@STEP]`: what `Trainer.init_state(seed,
    params)` takes. Holds the whole model, as the model will."""
    config, flat = load_flat_params(spec, weights=weights)
    return config, unflatten(flat)
