"""Release checkpoints (`dit.pt`, safetensors or HF shards, release names) in and out of the JAX model,
and the model from a JAX trainer checkpoint (`load_trainer_checkpoint`).

Loading is strict: names and shapes are checked against the schema for the config before any
tensor is read, and the error names every missing, unexpected or mis-shaped tensor. Files are
read through the project's one release reader (`mugv.io.release`): memory-mapped, one tensor at a
time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mugv.config import DiTConfig, get_config
from mugv.io.base import is_floating
from mugv.io.release import ReleaseReader
from mugv.io.weights import load_flat_params
from mugv.layouts import jax as jax_layout
from mugv.schema import check_state_dict_shapes, release_schema
from mugv_jax.dit.model import MUGDiT, RuntimeOptions


def _widened(array: np.ndarray) -> np.ndarray:
    """Floating tensors as float32 (bf16/fp16 widen exactly); others unchanged."""
    if is_floating(array.dtype):
        return array.astype(np.float32, copy=False)
    return array


def abstract_model(config: DiTConfig, options: RuntimeOptions | None = None) -> MUGDiT:
    """The model with ShapeDtypeStruct parameters: shapes and logical axes, nothing allocated."""
    return nnx.eval_shape(lambda: MUGDiT(config, rngs=nnx.Rngs(0), options=options))


def init(config: DiTConfig | str, seed: int = 0, options: RuntimeOptions | None = None) -> MUGDiT:
    """A freshly initialised model (reference-trainer initialisation)."""
    return MUGDiT(get_config(config), rngs=nnx.Rngs(seed), options=options)


def _path(p) -> str:
    return ".".join(str(k) for k in p)


def model_from_params(
    config: DiTConfig, params: dict[str, np.ndarray], options: RuntimeOptions | None = None
) -> MUGDiT:
    """Build a model from a flat {JAX path: array} dict; every parameter must be present."""
    graphdef, state = nnx.split(abstract_model(config, options))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        key = _path(path)
        if key not in params:
            raise KeyError(f"no value for JAX parameter {key}")
        arr = params[key]
        want = tuple(var.get_value().shape)
        if tuple(arr.shape) != want:
            raise ValueError(f"JAX parameter {key}: got shape {list(arr.shape)}, expected {list(want)}")
        var.set_value(jnp.asarray(arr, jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(
    path: str | os.PathLike,
    config: DiTConfig | str = "10b",
    *,
    options: RuntimeOptions | None = None,
    progress: bool = False,
) -> MUGDiT:
    """Load a release-layout DiT checkpoint (safetensors or torch `.pt`) into a JAX model.

    The returned model is called like the release model:
    `model(x, timestep, y, mask=..., x_mask=..., fps=..., frame_indice=...)` → [B, 48, T, H, W].
    """
    config = get_config(config)
    with ReleaseReader(os.fspath(path)) as ckpt:
        check_state_dict_shapes({n: e.shape for n, e in ckpt.entries().items()}, release_schema(config), ckpt.path)
        params = _jax_params(ckpt, config, progress)
    return model_from_params(config, params, options)


def load_trainer_checkpoint(spec: str, *, weights: str = "raw", options: RuntimeOptions | None = None) -> MUGDiT:
    """The model with the params (weights="raw") or EMA ("ema") of a JAX trainer checkpoint
    `jax:PATH[@STEP]`, at the config stored with them (mugv.io.weights.load_flat_params)."""
    config, flat = load_flat_params(spec, weights=weights)
    return model_from_params(config, flat, options)


def _jax_params(ckpt: ReleaseReader, config: DiTConfig, progress: bool) -> dict[str, np.ndarray]:
    names = list(release_schema(config))
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc=f"loading {os.path.basename(ckpt.path)}", unit="tensor")
    return params_from_release_items(((name, ckpt.get(name)) for name in names), config)


def params_from_release_items(items, config: DiTConfig) -> dict[str, np.ndarray]:
    """Flat {JAX path: float32 array} from release-layout (name, array) pairs, one at a time,
    each block tensor stacked at its layer; every JAX parameter must be covered."""
    shapes = jax_layout.jax_param_shapes(config)
    params: dict[str, np.ndarray] = {}
    for name, array in items:
        jpath, layer, arr = jax_layout.release_to_jax(name, _widened(np.asarray(array)), config)
        if layer is None:
            params[jpath] = arr
        else:
            if jpath not in params:
                params[jpath] = np.empty(shapes[jpath], np.float32)
            params[jpath][layer] = arr
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise KeyError(f"release tensors for JAX parameters {missing} are missing")
    return params


def flat_params(model: MUGDiT) -> dict[str, jax.Array]:
    return {_path(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def iter_release_tensors(model: MUGDiT) -> Iterator[tuple[str, np.ndarray]]:
    """(release name, float32 array) for every parameter, one at a time (JAX parameter order)."""
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    yield from jax_layout.jax_to_release_all(params, model.config)


def export_release_state_dict(model: MUGDiT) -> dict[str, np.ndarray]:
    """The model's parameters as a release-layout {name: float32 array} dict, in release order."""
    tensors = dict(iter_release_tensors(model))
    return {name: tensors[name] for name in release_schema(model.config)}
