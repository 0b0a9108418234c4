"""Release `vae.pt` layout ↔ `VideoVAE`: strict loading, bit-exact export, fast random init.

Module attributes mirror the release's module tree and parameters keep PyTorch layout, so a
variable's dotted path is its release name and values move without any transform; the
round trip release → JAX → release is therefore bit-exact by construction (and tested). Files are
read through the project's one release reader (`mugv.io.release`, memory-mapped).

`random_vae` fills the same abstract model from numpy instead of a file. The NNX constructor
draws every weight with its own jax.random op: eagerly that is one compile per distinct shape,
under `nnx.jit` one very large compile (~10 min for the release config on a loaded 2-core CPU).
For benchmarks, tests and fresh training runs the exact stream does not matter, so it draws the
same distributions from numpy: weights N(0, 1/fan_in) like `layers._normal_param`, biases 0,
norm scales 1, buffers and `logvar` at the constructor's values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mugv.io.base import dtype_name, is_floating
from mugv.io.release import ReleaseReader
from mugv.vae_config import (
    RELEASE_LATENT_SCALE,
    RELEASE_LATENT_SHIFT,
    VAEConfig,
    get_vae_config,
    release_vae_schema,
)
from mugv_jax.vae.layers import F32, Buffer
from mugv_jax.vae.model import VideoVAE


def _named_variables(state: nnx.State, config: VAEConfig) -> dict[str, nnx.Variable]:
    """{release name: variable} of a model state, in release order."""
    by_name = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
    schema = release_vae_schema(config)
    if set(by_name) != set(schema):
        # The module tree and the schema are two descriptions of one layout; they must agree.
        raise RuntimeError(
            f"VideoVAE variables and release_vae_schema disagree: {sorted(set(by_name) ^ set(schema))[:10]}"
        )
    return {name: by_name[name] for name in schema}


def _flat_variables(model: VideoVAE) -> dict[str, nnx.Variable]:
    return _named_variables(nnx.state(model, nnx.Any(nnx.Param, Buffer)), model.config)


def release_state(model: VideoVAE) -> dict[str, jax.Array | jax.ShapeDtypeStruct]:
    """{release name: value} in release order, without copying (abstract models give shapes)."""
    return {name: var.get_value() for name, var in _flat_variables(model).items()}


def export_release_state_dict(model: VideoVAE) -> dict[str, np.ndarray]:
    """The model as the release's flat state dict: float32 numpy arrays in PyTorch layout."""
    return {name: np.array(value) for name, value in release_state(model).items()}


def _as_f32(array: np.ndarray, name: str, path: str) -> np.ndarray:
    if not is_floating(array.dtype):
        raise ValueError(f"tensor {name!r} in {path} has dtype {dtype_name(array.dtype)}; expected a floating tensor")
    return array.astype(np.float32, copy=False)


def read_release_tensors(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], Callable[[str], np.ndarray]]:
    """(shapes, get) for a `.safetensors` file, a torch state dict (`.pt`/`.pth`/`.bin`) or HF
    shards; `get(name)` reads one tensor (memory-mapped) as float32."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE checkpoint {path} does not exist")
    reader = ReleaseReader(path)
    shapes = {n: e.shape for n, e in reader.entries().items()}
    return shapes, lambda name: _as_f32(reader.get(name), name, path)


def check_strict(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: str):
    """Raise ValueError listing every missing, unexpected or mis-shaped tensor of `path`."""
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name!r} (model expects shape {shape}) in {path}")
        elif tuple(found[name]) != tuple(shape):
            problems.append(
                f"tensor {name!r} in {path} has shape {tuple(found[name])}, the model expects {tuple(shape)}"
            )
    for name in found:
        if name not in expected:
            problems.append(f"unexpected tensor {name!r} (shape {tuple(found[name])}) in {path}: not part of the model")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"strict load of {path} failed ({len(problems)} problems):\n  " + "\n  ".join(shown))


def load(path: str | os.PathLike, config: VAEConfig | str = "release", *, compute_dtype=F32) -> VideoVAE:
    """A `VideoVAE` holding the tensors of a release-layout checkpoint (strict, float32 params).

    The model is built abstractly first, so no random weights are ever allocated.
    """
    config = get_vae_config(config)
    path = os.fspath(path)
    abstract = nnx.eval_shape(lambda: VideoVAE(config, rngs=nnx.Rngs(0), compute_dtype=compute_dtype))
    graphdef, state = nnx.split(abstract)
    variables = _named_variables(state, config)
    shapes, get = read_release_tensors(path)
    check_strict({n: tuple(v.get_value().shape) for n, v in variables.items()}, shapes, path)
    for name, var in variables.items():
        var.set_value(jnp.asarray(get(name), dtype=var.get_value().dtype))
    return nnx.merge(graphdef, state)


def random_vae(config: VAEConfig | str, seed: int = 0, compute_dtype=F32) -> VideoVAE:
    """A `VideoVAE` with random weights drawn in numpy (no XLA compile; see the module docstring)."""
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


def abstract_params(config: VAEConfig | str) -> dict[str, tuple[int, ...]]:
    """{release name: shape} of the VAE's trained parameters (its buffers excluded), in the
    order jax flattens their tree (the order of the trainer's checkpointed leaves)."""
    config = get_vae_config(config)
    abstract = nnx.eval_shape(lambda: VideoVAE(config, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))
    return {".".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}
