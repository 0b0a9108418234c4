"""The DiT weights in a JAX trainer checkpoint (orbax, mugv_jax/train/checkpointing.py), without
orbax's restore and without the JAX model: locate a step, open `state/params` (or `state/ema`)
array by array with tensorstore, read the model config stored with them (or detect it from the
shapes).

    config, params = load_params("jax:runs/x/checkpoints@1000")   # Trainer.init_state(seed, params)

A checkpoint is `<manager dir>/<step>/` with items `state` (params and ema: nested dicts keyed by
the JAX layout's dotted paths, mugv/layouts/jax.py), `data` and `config`. `PATH@STEP` picks a
step, else the newest. The converters' JAX reader builds on `StoredParams` (one layer at a time);
`mugv.io.weights` reads a whole checkpoint in release names (`StoredParams.release_items`).
orbax and tensorstore (and with orbax, jax) are imported inside the functions that open arrays.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterator

import numpy as np

from mugv.config import DiTConfig
from mugv.layouts import jax as jax_layout
from mugv.schema import detect_config
from mugv.training import unflatten


def _steps(manager_dir: str) -> list[int]:
    if not os.path.isdir(manager_dir):
        return []
    # Orbax writes a step under a temporary name and renames it when complete: a plain number
    # is a finished step.
    return sorted(
        int(n) for n in os.listdir(manager_dir) if n.isdigit() and os.path.isdir(os.path.join(manager_dir, n, "state"))
    )


def is_jax_checkpoint(path: str) -> bool:
    return (
        os.path.isfile(os.path.join(path, "state", "_METADATA"))
        or bool(_steps(path))
        or bool(_steps(os.path.join(path, "checkpoints")))
    )


def resolve_step_dir(path: str, step: int | None) -> tuple[str, int | None, list[int]]:
    """(step directory, step, all steps) for a manager dir, a workdir, or a step dir."""
    if os.path.isfile(os.path.join(path, "state", "_METADATA")):
        base = os.path.basename(os.path.normpath(path))
        return path, (int(base) if base.isdigit() else None), []
    manager = path
    if not _steps(path) and _steps(os.path.join(path, "checkpoints")):
        manager = os.path.join(path, "checkpoints")
    steps = _steps(manager)
    if not steps:
        raise FileNotFoundError(f"{path}: no orbax checkpoint (no <step>/state directory)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{path}: no step {step} (steps present: {steps})")
    return os.path.join(manager, str(step)), step, steps


def parse_spec(spec: str) -> tuple[str, int | None]:
    """(path, step) of `jax:PATH[@STEP]` (the prefix is optional)."""
    path = spec[len("jax:") :] if spec.startswith("jax:") else spec
    base, at, tail = path.rpartition("@")
    if at and tail.isdigit():
        return os.path.expanduser(base), int(tail)
    return os.path.expanduser(path), None


def config_from_jax_shapes(shapes: dict[str, tuple], source: str) -> DiTConfig:
    """Detect the config from JAX-layout shapes via the release-name detector."""
    need = {
        "x_embedder.kernel",
        "blocks.attn.q_norm.scale",
        "blocks.mlp.fc1.kernel",
        "y_embedder.fc1.kernel",
        "t_embedder.fc1.kernel",
        "final_layer.linear.kernel",
    }
    missing = sorted(need - set(shapes))
    if missing:
        raise ValueError(f"{source}: cannot detect the model configuration, no {missing}")
    kt, kh, kw, cin, c = shapes["x_embedder.kernel"]
    depth, d = shapes["blocks.attn.q_norm.scale"]
    f = shapes["blocks.mlp.fc1.kernel"][2]
    release = {
        "x_embedder.proj.weight": (c, cin, kt, kh, kw),
        "blocks.0.attn.q_norm.weight": (d,),
        f"blocks.{depth - 1}.attn.q_norm.weight": (d,),
        "blocks.0.mlp.fc1.weight": (f, c),
        "y_embedder.y_proj.fc1.weight": tuple(reversed(shapes["y_embedder.fc1.kernel"])),
        "t_embedder.mlp.0.weight": tuple(reversed(shapes["t_embedder.fc1.kernel"])),
        "final_layer.linear.weight": tuple(reversed(shapes["final_layer.linear.kernel"])),
    }
    return detect_config(release)


def _state_metadata(state_dir: str) -> dict:
    with open(os.path.join(state_dir, "_METADATA")) as f:
        return json.load(f)


def state_entries(state_dir: str) -> list[tuple[str, ...]]:
    """The key path of every leaf of a saved state item (`("params", "blocks", …)`), from its
    metadata alone."""
    return [ast.literal_eval(k) for k in _state_metadata(state_dir)["tree_metadata"]]


def open_state_arrays(state_dir: str, names: list[str]) -> dict:
    """{dotted leaf name: tensorstore array, opened but not read} of a saved state item, with
    orbax's own read spec and context (OCDBT or not, zarr v2 or v3, as the metadata says)."""
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    meta = _state_metadata(state_dir)
    use_ocdbt, use_zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", False))
    context = ts_utils.get_ts_context(use_ocdbt=use_ocdbt)
    out = {}
    for name in names:
        spec = ts_utils.ArrayReadSpec(state_dir, name, use_zarr3, use_ocdbt=use_ocdbt)
        out[name] = ts.open(spec.json, context=context).result()
    return out


class StoredParams:
    """The params (weights="raw") or EMA (weights="ema") arrays of one checkpoint step, opened
    with tensorstore (orbax's own read spec and context) and not yet read: `arrays` maps each
    JAX path to its array. `config` is the stored model config, else detected from the shapes;
    shapes that disagree with it raise, naming every mismatched array."""

    def __init__(self, path: str, step: int | None = None, weights: str = "raw"):
        if weights not in ("raw", "ema"):
            raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
        self.path, self.weights = path, weights
        self.step_dir, self.step, self.steps = resolve_step_dir(path, step)
        self.state_dir = os.path.join(self.step_dir, "state")
        tree = state_entries(self.state_dir)
        self.state_keys = sorted({k[0] for k in tree})
        self.root = "params" if weights == "raw" else "ema"
        paths = [".".join(k[1:]) for k in tree if k[0] == self.root]
        if not paths:
            raise ValueError(f"{self.step_dir}: the state holds no {self.root!r} (entries: {self.state_keys})")
        opened = open_state_arrays(self.state_dir, [f"{self.root}.{p}" for p in paths])
        self.arrays = {p: opened[f"{self.root}.{p}"] for p in paths}
        shapes = {p: tuple(a.shape) for p, a in self.arrays.items()}
        self.stored_config = None
        config_file = os.path.join(self.step_dir, "config", "metadata")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                model = json.load(f).get("model")
            if isinstance(model, dict):
                self.stored_config = DiTConfig.from_dict(model)
        self.config = self.stored_config or config_from_jax_shapes(shapes, self.step_dir)
        want = jax_layout.jax_param_shapes(self.config)
        bad = [
            f"{p}: {list(s)} in checkpoint, model expects {list(want[p])}"
            for p, s in shapes.items()
            if p in want and tuple(want[p]) != s
        ]
        if bad:
            raise ValueError(f"{self.step_dir} ({self.root}) does not match the model schema:\n  " + "\n  ".join(bad))

    def _complete(self) -> dict[str, tuple]:
        """The model's JAX shapes, once the stored arrays are checked to be exactly those."""
        want = jax_layout.jax_param_shapes(self.config)
        missing = sorted(set(want) - set(self.arrays))
        unexpected = sorted(set(self.arrays) - set(want))
        if missing or unexpected:
            raise ValueError(
                f"{self.step_dir}: {self.weights} weights do not match the model: "
                f"missing {missing}, unexpected {unexpected}"
            )
        return want

    def read_all(self) -> dict[str, np.ndarray]:
        """Every array as float32 (the whole model in memory, as a model needs); the set of
        arrays must be exactly the model's."""
        want = self._complete()
        return {p: np.asarray(self.arrays[p].read().result(), np.float32) for p in want}

    def release_items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(release name, array in its stored dtype) for every tensor, one JAX array read at a
        time (the whole stack of a layer tensor, then its layers); the set of arrays must be
        exactly the model's."""
        want = self._complete()
        for p in want:
            yield from jax_layout.jax_to_release_all({p: self.arrays[p].read().result()}, self.config)


def load_flat_params(spec: str, *, weights: str = "raw") -> tuple[DiTConfig, dict[str, np.ndarray]]:
    """(config, {JAX path: float32 array}) of `jax:PATH[@STEP]`."""
    path, step = parse_spec(spec)
    stored = StoredParams(path, step, weights)
    return stored.config, stored.read_all()


def load_params(spec: str, *, weights: str = "raw") -> tuple[DiTConfig, dict]:
    """(config, nested float32 params dict) of `jax:PATH[@STEP]`: what `Trainer.init_state(seed,
    params)` takes. Holds the whole model, as the model will."""
    config, flat = load_flat_params(spec, weights=weights)
    return config, unflatten(flat)
