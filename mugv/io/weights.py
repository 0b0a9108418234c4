"""A run's starting weights from a checkpoint in any format, in release names: what both trainers'
`config.init_from` reads (`config.init_weights`: "raw" or "ema").

    state = open_weights("megatron:/runs/a/checkpoints", model=config, weights="ema")

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

import glob
import os

import numpy as np

from mugv.config import DiTConfig, get_config
from mugv.schema import check_state_dict_shapes, release_schema

KINDS = ("release", "jax", "megatron")


def parse_spec(spec: str) -> tuple[str, str, int | None]:
    """(kind, path, step or iteration) of an `init_from` spec; an unprefixed directory that is
    a JAX or Megatron checkpoint is that kind, anything else a release file."""
    head, sep, rest = spec.partition(":")
    kind, path = (head, rest) if sep and head in KINDS else (None, spec)
    path = os.path.expanduser(path)
    if kind == "release":
        return kind, path, None
    base, at, tail = path.rpartition("@")
    number = int(tail) if at and tail.isdigit() else None
    where = base if number is not None else path
    if kind is None:
        from mugv.io import orbax, torch_dist

        if os.path.isdir(where) and orbax.is_jax_checkpoint(where):
            kind = "jax"
        elif os.path.isdir(where) and (
            os.path.isfile(os.path.join(where, torch_dist.TRACKER)) or torch_dist.is_torch_dist_dir(where)
        ):
            kind = "megatron"
        else:
            return "release", path, None
    return kind, where, number


def open_weights(spec: str, *, model: DiTConfig | str, weights: str = "raw") -> dict[str, np.ndarray]:
    """{release name: array} of `spec` for a run of `model` (release order), the training
    checkpoint's EMA with `weights="ema"`."""
    if weights not in ("raw", "ema"):
        raise ValueError(f"config.init_weights must be 'raw' or 'ema', got {weights!r}")
    model = get_config(model)
    kind, path, number = parse_spec(spec)
    if kind == "release" and weights == "ema":
        raise ValueError(
            f"config.init_from={spec} is a release checkpoint, which holds one set of "
            f"weights: config.init_weights='ema' needs a training checkpoint with an EMA "
            f"(jax:DIR[@STEP] or megatron:DIR[@ITER]); use config.init_weights='raw'"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.init_from={spec}: {path} does not exist")
    schema = release_schema(model)
    if kind == "jax":
        from mugv.io.orbax import StoredParams

        stored = StoredParams(path, number, weights)
        check_state_dict_shapes(release_schema(stored.config), schema, f"{stored.step_dir} ({stored.root})")
        state = dict(stored.release_items())
    else:
        reader = _release_reader(path) if kind == "release" else _torch_dist_reader(spec, path, number, weights)
        with reader:
            check_state_dict_shapes(
                {n: e.shape for n, e in reader.entries().items()}, schema, getattr(reader, "dir", reader.path)
            )
            # The per-head regroup of Megatron tensors follows the run's model.
            reader.layout_config = model
            state = dict(reader.items())
    check_state_dict_shapes({n: a.shape for n, a in state.items()}, schema, spec)
    return {name: state[name] for name in schema}


def _release_reader(path: str):
    from mugv.io.release import ReleaseReader

    return ReleaseReader(path)


def _torch_dist_reader(spec: str, path: str, number: int | None, weights: str):
    from mugv.io.torch_dist import TorchDistReader

    try:
        return TorchDistReader(path, number, weights)
    except FileNotFoundError as e:
        if glob.glob(os.path.join(glob.escape(path), "mp_rank_*")) or glob.glob(
            os.path.join(glob.escape(path), "*", "mp_rank_*")
        ):
            raise ValueError(
                f"config.init_from={spec} is a legacy Megatron checkpoint (mp_rank_* files); "
                f"init_from reads torch_dist. Convert it first: python -m converters convert "
                f"--src megatron-legacy:{path} --dst release:OUT.safetensors"
            ) from e
        raise
