"""Function-preserving width expansion of a trained MUG-DiT (docs/reference.md §7.1, HyperCloning-like).

`python -m mugv_jax.recipe.expand --src jax:RUN/checkpoints --dst WIDE --factor 2` turns a hidden-C,
H-head model into a hidden-e·C, e·H-head one (head dim and depth unchanged) that computes the same
function, then perturbs it so the copies can drift apart when training continues.

Construction (every claim is checked by tests/mugv_jax/test_expand.py): the widened residual stream is the
small one tiled e times, x' = [x, x, ..., x]. Then
* LayerNorm over the hidden dim (with or without affine, tiled) sees the same mean and variance,
  so LN(x') = tile(LN(x)); modulation shift/scale/gate vectors are tiled.
* A weight contracting a tiled input is tiled along that axis and divided by e:
  Σ_copies (W/e)·x = W·x. A weight producing a tiled output is tiled along that axis.
* Heads: the new head index is copy·H + h, so q, k, v of the duplicated heads are equal; q/k
  RMSNorm is per head over head_dim (unchanged), RoPE acts per head, so every duplicate attends
  exactly like its original. The output projection contracts e·H heads, each copy divided by e.
* t_block's output is 6 chunks of C; each chunk is tiled (reshape [C, 6, C] first).
* Caption features (text_dim) and latent patches are not widened: only their projections'
  outputs are tiled; the final linear contracts the tiled hidden (÷e) into unchanged outputs.
Nothing is left out: the map is exact in real arithmetic; float32 reorders sums (≈1e-7 relative).

Symmetry breaking (`--noise-mode`):
* `zero_sum` (default): noise on every contracted (÷e) axis whose e copies sum to zero. With the
  inputs still exact copies the function is unchanged, but the copies of each downstream unit now
  receive different gradients, so the duplicates separate from the first update on.
* `independent`: i.i.d. noise on every widened tensor (the paper's "small random perturbations");
  the function moves by an amount that scales with `noise_std`.
`noise_std` is relative to each tensor's own standard deviation.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from mugv.config import DiTConfig
from mugv.io import orbax
from mugv.io.spec import parse_spec
from mugv.layouts.jax import flatten, unflatten

# Per parameter path: (axis, kind) for every axis that grows. "rep" replicates an output axis,
# "sum" replicates a contracted input axis and divides by e. Negative axes count from the end so
# one rule covers the stacked per-layer tensors.
_RULES: dict[str, tuple[tuple[int, str], ...]] = {
    "start_token": ((-1, "rep"),),
    "end_token": ((-1, "rep"),),
    "x_embedder.kernel": ((-1, "rep"),),
    "x_embedder.bias": ((-1, "rep"),),
    "t_embedder.fc1.kernel": ((-1, "rep"),),
    "t_embedder.fc1.bias": ((-1, "rep"),),
    "t_embedder.fc2.kernel": ((0, "sum"), (1, "rep")),
    "t_embedder.fc2.bias": ((-1, "rep"),),
    "fps_embedder.fc1.kernel": ((-1, "rep"),),
    "fps_embedder.fc1.bias": ((-1, "rep"),),
    "fps_embedder.fc2.kernel": ((0, "sum"), (1, "rep")),
    "fps_embedder.fc2.bias": ((-1, "rep"),),
    "y_embedder.fc1.kernel": ((-1, "rep"),),
    "y_embedder.fc1.bias": ((-1, "rep"),),
    "y_embedder.fc2.kernel": ((0, "sum"), (1, "rep")),
    "y_embedder.fc2.bias": ((-1, "rep"),),
    # t_block is reshaped to [C, 6, C] / [6, C] around these rules (see _widen_tensor).
    "t_block.kernel": ((0, "sum"), (2, "rep")),
    "t_block.bias": ((-1, "rep"),),
    "blocks.scale_shift_table": ((-1, "rep"),),
    "blocks.attn.qkv.kernel": ((1, "sum"), (3, "rep")),  # [L, C, 3, H, D]
    "blocks.attn.qkv.bias": ((2, "rep"),),  # [L, 3, H, D]
    "blocks.attn.q_norm.scale": (),
    "blocks.attn.k_norm.scale": (),
    "blocks.attn.proj.kernel": ((1, "sum"), (3, "rep")),  # [L, H, D, C]
    "blocks.attn.proj.bias": ((-1, "rep"),),
    "blocks.cross_attn_norm.scale": ((-1, "rep"),),
    "blocks.cross_attn_norm.bias": ((-1, "rep"),),
    "blocks.cross_attn.q.kernel": ((1, "sum"), (2, "rep")),  # [L, C, H, D]
    "blocks.cross_attn.q.bias": ((1, "rep"),),  # [L, H, D]
    "blocks.cross_attn.kv.kernel": ((1, "sum"), (3, "rep")),  # [L, C, 2, H, D]
    "blocks.cross_attn.kv.bias": ((2, "rep"),),  # [L, 2, H, D]
    "blocks.cross_attn.q_norm.scale": (),
    "blocks.cross_attn.k_norm.scale": (),
    "blocks.cross_attn.proj.kernel": ((1, "sum"), (3, "rep")),  # [L, H, D, C]
    "blocks.cross_attn.proj.bias": ((-1, "rep"),),
    "blocks.mlp.fc1.kernel": ((1, "sum"), (2, "rep")),  # [L, C, F]
    "blocks.mlp.fc1.bias": ((-1, "rep"),),
    "blocks.mlp.fc2.kernel": ((1, "sum"), (2, "rep")),  # [L, F, C]
    "blocks.mlp.fc2.bias": ((-1, "rep"),),
    "final_layer.scale_shift_table": ((-1, "rep"),),
    "final_layer.linear.kernel": ((0, "sum"),),
    "final_layer.linear.bias": (),
}

NOISE_MODES = ("zero_sum", "independent")


def widened_config(config: DiTConfig, factor: int) -> DiTConfig:
    """hidden and heads × factor; head dim, depth, text width and everything else unchanged."""
    if int(factor) != factor or factor < 1:
        raise ValueError(f"expansion factor must be a positive integer, got {factor}")
    factor = int(factor)
    return config.replace(hidden_size=config.hidden_size * factor, num_heads=config.num_heads * factor)


def _widen_tensor(path: str, a: np.ndarray, factor: int, config: DiTConfig) -> np.ndarray:
    rules = _RULES[path]
    c = config.hidden_size
    if path == "t_block.kernel":
        a = a.reshape(c, 6, c)
    elif path == "t_block.bias":
        a = a.reshape(6, c)
    for axis, kind in rules:
        a = np.concatenate([a] * factor, axis=axis)
        if kind == "sum":
            a = a / np.float32(factor)
    if path == "t_block.kernel":
        a = a.reshape(c * factor, 6 * c * factor)
    elif path == "t_block.bias":
        a = a.reshape(6 * c * factor)
    return np.ascontiguousarray(a, np.float32)


def _zero_sum_noise(rng, shape, axis: int, factor: int, std: float) -> np.ndarray:
    """Gaussian noise whose `factor` copies along `axis` (copy-major blocks) sum to zero."""
    axis = axis % len(shape)
    n = shape[axis] // factor
    z = rng.standard_normal(shape).astype(np.float32) * np.float32(std)
    blocks = z.reshape(shape[:axis] + (factor, n) + shape[axis + 1 :])
    blocks = blocks - blocks.mean(axis=axis, keepdims=True)
    # Rescale so each entry keeps variance std² after removing the mean across copies.
    if factor > 1:
        blocks = blocks * np.float32(np.sqrt(factor / (factor - 1)))
    return blocks.reshape(shape)


def expand_params(
    params: dict, config: DiTConfig, factor: int, *, noise_std: float = 0.0, noise_mode: str = "zero_sum", seed: int = 0
) -> tuple[DiTConfig, dict]:
    """(widened config, widened nested params). `noise_std` = 0 gives the exact tiling."""
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    new_config = widened_config(config, factor)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    missing, unknown = sorted(set(_RULES) - set(flat)), sorted(set(flat) - set(_RULES))
    if missing or unknown:
        raise ValueError(f"parameters do not match the MUG-DiT layout: missing {missing}, unknown {unknown}")
    rng = np.random.default_rng(seed)
    out = {}
    for path in sorted(flat):
        a = flat[path]
        wide = _widen_tensor(path, a, int(factor), config)
        std = float(noise_std * np.std(a))
        if std > 0 and factor > 1:
            if noise_mode == "independent" and _RULES[path]:
                wide = wide + rng.standard_normal(wide.shape).astype(np.float32) * np.float32(std)
            elif noise_mode == "zero_sum":
                for axis, kind in _RULES[path]:
                    if kind == "sum" and path != "t_block.kernel":
                        wide = wide + _zero_sum_noise(rng, wide.shape, axis, int(factor), std)
                    elif kind == "sum":
                        # Contracted axis 0 of [eC, 6·eC] is the same in the flat layout.
                        wide = wide + _zero_sum_noise(rng, wide.shape, 0, int(factor), std)
        out[path] = wide
    want = _expected_shapes(new_config)
    bad = [f"{p}: {list(out[p].shape)} != {list(s)}" for p, s in want.items() if tuple(out[p].shape) != tuple(s)]
    if bad:
        raise AssertionError("widened shapes disagree with the model schema: " + "; ".join(bad))
    return new_config, unflatten(out)


def _expected_shapes(config: DiTConfig) -> dict:
    from mugv.layouts import jax as jax_layout

    return jax_layout.jax_param_shapes(config)


def save_params(params: dict, config: DiTConfig, directory: str, step: int = 0) -> str:
    """Write params (as both `params` and `ema`) as a JAX checkpoint that `init_from=jax:DIR` and
    the converters read. Orbax writes the step under a temporary name and renames it complete."""
    from mugv_jax.train import checkpointing

    ck = checkpointing.Checkpointer(directory, keep=1, use_async=False)
    try:
        ck.save(step, {orbax.PARAMS: params, orbax.EMA: params}, {}, orbax.config_item(config), force=True)
        ck.wait()
    finally:
        ck.close()
    return os.path.join(os.path.abspath(directory), str(step))


def load_any(spec: str, weights: str = "raw") -> tuple[DiTConfig, dict]:
    """(config, nested params) from `jax:DIR[@STEP]` or a release file `.pt`/`.safetensors`
    (`FILE:PRESET`, e.g. `dit.safetensors:tiny`, picks the release model's size)."""
    if parse_spec(spec).format == "jax":
        from mugv.io.weights import load_params

        return load_params(spec, weights=weights)
    from flax import nnx

    from mugv.config import get_config
    from mugv_jax import dit

    path, _, preset = spec.partition(":")
    if not preset:
        raise ValueError(f"--src {spec}: a release file needs its size, e.g. {spec}:10b")
    model = dit.load(path, get_config(preset), progress=True)
    return model.config, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mugv_jax.recipe.expand", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="jax:DIR[@STEP] or RELEASE_FILE:PRESET")
    p.add_argument("--dst", required=True, help="output directory (a JAX checkpoint, use as init_from=jax:DST)")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--noise-std", type=float, default=1e-3, help="relative to each tensor's std")
    p.add_argument("--noise-mode", choices=NOISE_MODES, default="zero_sum")
    p.add_argument("--weights", choices=("raw", "ema"), default="ema", help="which weights of a jax: source")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if os.path.exists(a.dst) and os.listdir(a.dst):
        p.error(f"--dst {a.dst} exists and is not empty")
    config, params = load_any(a.src, a.weights)
    new_config, wide = expand_params(
        params, config, a.factor, noise_std=a.noise_std, noise_mode=a.noise_mode, seed=a.seed
    )
    path = save_params(wide, new_config, a.dst)
    print(
        f"widened hidden {config.hidden_size}->{new_config.hidden_size}, heads "
        f"{config.num_heads}->{new_config.num_heads} (head dim {new_config.head_dim}); wrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
