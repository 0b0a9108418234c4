"""The JAX (Flax NNX) parameter layout and its exact map to and from the release layout.

The JAX model stores every per-block tensor stacked over layers (leading axis = layer), keeps
kernels as [in, out] with the head axes split out ([C, 3, heads, head_dim] for the fused QKV) so
that the tensor-parallel axis is a named dimension rather than a slice of a fused one. Each rule
below is a pure numpy transform (reshape/transpose only) so conversions are bit-exact both ways
and need one tensor in memory at a time.

Paths are dotted module paths of the NNX model (`blocks.attn.qkv.kernel`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from mugv.config import DiTConfig
from mugv.lora import SITES

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Rule:
    jax_path: str
    # Shape of the JAX tensor (per layer for stacked tensors), from the config.
    shape: Callable[[DiTConfig], Shape]
    to_jax: Callable[[np.ndarray, DiTConfig], np.ndarray]
    to_release: Callable[[np.ndarray, DiTConfig], np.ndarray]


def _same(a, cfg):
    return a


_TILE = 256
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose2d(a: np.ndarray) -> np.ndarray:
    """`a.T` as a new C-contiguous array, copied tile by tile.

    numpy's own copy of a transposed view walks one side with a stride of a whole row and runs
    at a few hundred MB/s on large kernels; 256 x 256 tiles stay in cache and run several times
    faster. The bits move unchanged (custom dtypes such as bfloat16 are copied as same-size
    unsigned integers, numpy's native loops).
    """
    rows, cols = a.shape
    if rows * cols <= _TILE * _TILE:
        return np.ascontiguousarray(a.T)
    src = a.view(_UINT[a.dtype.itemsize]) if a.dtype.itemsize in _UINT else a
    out = np.empty((cols, rows), src.dtype)
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            out[j : j + _TILE, i : i + _TILE] = src[i : i + _TILE, j : j + _TILE].T
    return out.view(a.dtype)


def _t(a, cfg):
    return transpose2d(a)


def _rule_identity(path, shape):
    return _Rule(path, shape, _same, _same)


def _rule_linear(path, shape):
    """A torch Linear weight [out, in] ↔ a JAX kernel [in, out]."""
    return _Rule(path, shape, _t, _t)


def _heads_out(n: int):
    """[n·C, C] (rows ordered [part, head, head_dim]) ↔ kernel [C, n, heads, head_dim]."""

    def to_jax(a, cfg):
        c, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        k = transpose2d(a.reshape(n * h * d, c))
        return k.reshape(c, n, h, d) if n > 1 else k.reshape(c, h, d)

    def to_release(a, cfg):
        c = cfg.hidden_size
        return transpose2d(a.reshape(c, n * c))

    return to_jax, to_release


def _heads_bias(n: int):
    def to_jax(a, cfg):
        b = a.reshape(n, cfg.num_heads, cfg.head_dim)
        return b if n > 1 else b[0]

    def to_release(a, cfg):
        return a.reshape(-1)

    return to_jax, to_release


def _heads_in_to_jax(a, cfg):
    # torch [C_out, C_in] with C_in ordered (head, head_dim) → kernel [heads, head_dim, C_out].
    return transpose2d(a).reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def _heads_in_to_release(a, cfg):
    return transpose2d(a.reshape(cfg.hidden_size, cfg.hidden_size))


def _conv_to_jax(a, cfg):
    # Conv3d [C_out, C_in, kt, kh, kw] → [kt, kh, kw, C_in, C_out].
    return a.transpose(2, 3, 4, 1, 0)


def _conv_to_release(a, cfg):
    return a.transpose(4, 3, 0, 1, 2)


def _c(cfg):
    return (cfg.hidden_size,)


def _hd(cfg):
    return (cfg.num_heads, cfg.head_dim)


_qkv_w = _heads_out(3)
_kv_w = _heads_out(2)
_q_w = _heads_out(1)
_qkv_b = _heads_bias(3)
_kv_b = _heads_bias(2)
_q_b = _heads_bias(1)

# Release name (or per-block suffix after "blocks.{i}.") → rule.
_GLOBAL_RULES: dict[str, _Rule] = {
    "start_token": _rule_identity("start_token", _c),
    "end_token": _rule_identity("end_token", _c),
    "x_embedder.proj.weight": _Rule(
        "x_embedder.kernel",
        lambda cfg: (*cfg.patch_size, cfg.in_channels, cfg.hidden_size),
        _conv_to_jax,
        _conv_to_release,
    ),
    "x_embedder.proj.bias": _rule_identity("x_embedder.bias", _c),
    "t_block.1.weight": _rule_linear("t_block.kernel", lambda cfg: (cfg.hidden_size, 6 * cfg.hidden_size)),
    "t_block.1.bias": _rule_identity("t_block.bias", lambda cfg: (6 * cfg.hidden_size,)),
    "y_embedder.y_proj.fc1.weight": _rule_linear("y_embedder.fc1.kernel", lambda cfg: (cfg.text_dim, cfg.hidden_size)),
    "y_embedder.y_proj.fc1.bias": _rule_identity("y_embedder.fc1.bias", _c),
    "y_embedder.y_proj.fc2.weight": _rule_linear(
        "y_embedder.fc2.kernel", lambda cfg: (cfg.hidden_size, cfg.hidden_size)
    ),
    "y_embedder.y_proj.fc2.bias": _rule_identity("y_embedder.fc2.bias", _c),
    "final_layer.scale_shift_table": _rule_identity("final_layer.scale_shift_table", lambda cfg: (2, cfg.hidden_size)),
    "final_layer.linear.weight": _rule_linear(
        "final_layer.linear.kernel", lambda cfg: (cfg.hidden_size, cfg.patch_volume * cfg.out_channels)
    ),
    "final_layer.linear.bias": _rule_identity(
        "final_layer.linear.bias", lambda cfg: (cfg.patch_volume * cfg.out_channels,)
    ),
}
for _emb in ("t_embedder", "fps_embedder"):
    _GLOBAL_RULES.update(
        {
            f"{_emb}.mlp.0.weight": _rule_linear(
                f"{_emb}.fc1.kernel", lambda cfg: (cfg.frequency_dim, cfg.hidden_size)
            ),
            f"{_emb}.mlp.0.bias": _rule_identity(f"{_emb}.fc1.bias", _c),
            f"{_emb}.mlp.2.weight": _rule_linear(f"{_emb}.fc2.kernel", lambda cfg: (cfg.hidden_size, cfg.hidden_size)),
            f"{_emb}.mlp.2.bias": _rule_identity(f"{_emb}.fc2.bias", _c),
        }
    )

_BLOCK_RULES: dict[str, _Rule] = {
    "scale_shift_table": _rule_identity("blocks.scale_shift_table", lambda cfg: (6, cfg.hidden_size)),
    "attn.qkv.weight": _Rule("blocks.attn.qkv.kernel", lambda cfg: (cfg.hidden_size, 3, *_hd(cfg)), *_qkv_w),
    "attn.qkv.bias": _Rule("blocks.attn.qkv.bias", lambda cfg: (3, *_hd(cfg)), *_qkv_b),
    "attn.q_norm.weight": _rule_identity("blocks.attn.q_norm.scale", lambda cfg: (cfg.head_dim,)),
    "attn.k_norm.weight": _rule_identity("blocks.attn.k_norm.scale", lambda cfg: (cfg.head_dim,)),
    "attn.proj.weight": _Rule(
        "blocks.attn.proj.kernel", lambda cfg: (*_hd(cfg), cfg.hidden_size), _heads_in_to_jax, _heads_in_to_release
    ),
    "attn.proj.bias": _rule_identity("blocks.attn.proj.bias", _c),
    "cross_attn_norm.weight": _rule_identity("blocks.cross_attn_norm.scale", _c),
    "cross_attn_norm.bias": _rule_identity("blocks.cross_attn_norm.bias", _c),
    "cross_attn.q_linear.weight": _Rule("blocks.cross_attn.q.kernel", lambda cfg: (cfg.hidden_size, *_hd(cfg)), *_q_w),
    "cross_attn.q_linear.bias": _Rule("blocks.cross_attn.q.bias", _hd, *_q_b),
    "cross_attn.kv_linear.weight": _Rule(
        "blocks.cross_attn.kv.kernel", lambda cfg: (cfg.hidden_size, 2, *_hd(cfg)), *_kv_w
    ),
    "cross_attn.kv_linear.bias": _Rule("blocks.cross_attn.kv.bias", lambda cfg: (2, *_hd(cfg)), *_kv_b),
    "cross_attn.q_norm.weight": _rule_identity("blocks.cross_attn.q_norm.scale", lambda cfg: (cfg.head_dim,)),
    "cross_attn.k_norm.weight": _rule_identity("blocks.cross_attn.k_norm.scale", lambda cfg: (cfg.head_dim,)),
    "cross_attn.proj.weight": _Rule(
        "blocks.cross_attn.proj.kernel",
        lambda cfg: (*_hd(cfg), cfg.hidden_size),
        _heads_in_to_jax,
        _heads_in_to_release,
    ),
    "cross_attn.proj.bias": _rule_identity("blocks.cross_attn.proj.bias", _c),
    "mlp.fc1.weight": _rule_linear("blocks.mlp.fc1.kernel", lambda cfg: (cfg.hidden_size, cfg.mlp_hidden_size)),
    "mlp.fc1.bias": _rule_identity("blocks.mlp.fc1.bias", lambda cfg: (cfg.mlp_hidden_size,)),
    "mlp.fc2.weight": _rule_linear("blocks.mlp.fc2.kernel", lambda cfg: (cfg.mlp_hidden_size, cfg.hidden_size)),
    "mlp.fc2.bias": _rule_identity("blocks.mlp.fc2.bias", _c),
}

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_JAX_TO_GLOBAL = {r.jax_path: name for name, r in _GLOBAL_RULES.items()}
_JAX_TO_BLOCK = {r.jax_path: suffix for suffix, r in _BLOCK_RULES.items()}


def _rule_for(name: str) -> tuple[_Rule, int | None]:
    if name in _GLOBAL_RULES:
        return _GLOBAL_RULES[name], None
    m = _BLOCK_NAME.match(name)
    if m and m.group(2) in _BLOCK_RULES:
        return _BLOCK_RULES[m.group(2)], int(m.group(1))
    raise KeyError(f"release tensor {name!r} has no JAX layout rule")


def jax_param_shapes(config: DiTConfig) -> dict[str, Shape]:
    """Every JAX parameter path and its full shape (stacked tensors lead with `depth`)."""
    out = {r.jax_path: tuple(r.shape(config)) for r in _GLOBAL_RULES.values()}
    out.update({r.jax_path: (config.depth, *r.shape(config)) for r in _BLOCK_RULES.values()})
    return out


def is_stacked(jax_path: str) -> bool:
    return jax_path in _JAX_TO_BLOCK


def jax_path_of(name: str) -> tuple[str, int | None]:
    """(JAX path, layer or None) of a release tensor; KeyError naming it if it has none."""
    rule, layer = _rule_for(name)
    return rule.jax_path, layer


def release_name_of(jax_path: str, layer: int | None = None) -> str:
    """The release name of a JAX tensor (one layer of a stacked one); KeyError naming it."""
    if jax_path in _JAX_TO_GLOBAL:
        return _JAX_TO_GLOBAL[jax_path]
    if jax_path in _JAX_TO_BLOCK:
        if layer is None:
            raise ValueError(f"{jax_path} is stacked over layers: pass the layer index")
        return f"blocks.{layer}.{_JAX_TO_BLOCK[jax_path]}"
    raise KeyError(f"JAX parameter {jax_path!r} has no release layout rule")


def release_to_jax(name: str, array: np.ndarray, config: DiTConfig) -> tuple[str, int | None, np.ndarray]:
    """One release tensor → (JAX path, layer index or None, array in JAX layout for that layer)."""
    rule, layer = _rule_for(name)
    # Contiguous copies: writers such as safetensors serialise the raw buffer of a view.
    return rule.jax_path, layer, np.ascontiguousarray(rule.to_jax(np.asarray(array), config))


def jax_to_release(
    jax_path: str, array: np.ndarray, config: DiTConfig, layer: int | None = None
) -> tuple[str, np.ndarray]:
    """One JAX tensor (one layer's slice for stacked ones) → (release name, array)."""
    name = release_name_of(jax_path, layer)
    rule = _GLOBAL_RULES[name] if jax_path in _JAX_TO_GLOBAL else _BLOCK_RULES[_JAX_TO_BLOCK[jax_path]]
    return name, np.ascontiguousarray(rule.to_release(np.asarray(array), config))


def jax_to_release_all(params: dict[str, np.ndarray], config: DiTConfig):
    """Yield (release name, array) for a flat {jax path: array} dict, one tensor at a time."""
    for path, arr in params.items():
        if is_stacked(path):
            for i in range(arr.shape[0]):
                yield jax_to_release(path, arr[i], config, layer=i)
        else:
            yield jax_to_release(path, arr, config)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": {"c": v}}} → {"a.b.c": v}: a nested params tree (or one shaped like it: the
    Adam moments, the EMA) keyed by dotted JAX paths. The inverse of `unflatten`."""
    out: dict = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, object]) -> dict:
    """{"a.b.c": v} → {"a": {"b": {"c": v}}}: the nested tree the model, the trainer and orbax
    checkpoints hold."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


# --- LoRA adapters (mugv/lora.py) --------------------------------------------------------------
# An adapter of a block linear whose kernel is [in..., out...] (per layer) is stored as
#   lora_a [in..., rank]   (release lora_A.weight [rank, in], transposed, input axes split out)
#   lora_b [rank, out...]  (release lora_B.weight [out, rank], transposed, output axes split out)
# next to the kernel, so the one sharding table shards A over its base's input axes and B over
# its output axes.

_ADAPTER = re.compile(r"^blocks\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def adapter_split(site: str, config: DiTConfig) -> tuple[Shape, Shape]:
    """(input axes, output axes) of a block linear's per-layer kernel, e.g. ((C,), (3, H, D))."""
    kernel = tuple(_BLOCK_RULES[f"{site}.weight"].shape(config))
    fan_in = next(s.shape_in(config) for s in SITES if s.release == site)
    for n in range(1, len(kernel)):
        if int(np.prod(kernel[:n])) == fan_in:
            return kernel[:n], kernel[n:]
    raise KeyError(f"{site}: no input/output split of its kernel {kernel}")


def adapter_jax_path(site: str, which: str) -> str:
    """JAX path of a site's adapter tensor (`which` "A" or "B"): blocks.attn.qkv.lora_a."""
    kernel = _BLOCK_RULES[f"{site}.weight"].jax_path
    return kernel.rsplit(".", 1)[0] + f".lora_{which.lower()}"


def adapter_to_jax(name: str, array: np.ndarray, config: DiTConfig) -> tuple[str, int, np.ndarray]:
    """One release-style adapter tensor → (JAX path, layer, array for that layer)."""
    m = _ADAPTER.match(name)
    if not m or f"{m.group(2)}.weight" not in _BLOCK_RULES:
        raise KeyError(f"{name!r} is not a block adapter tensor (blocks.<i>.<linear>.lora_A|B.weight)")
    layer, site, which = int(m.group(1)), m.group(2), m.group(3)
    ins, outs = adapter_split(site, config)
    t = transpose2d(np.asarray(array))
    t = t.reshape(*ins, t.shape[1]) if which == "A" else t.reshape(t.shape[0], *outs)
    return adapter_jax_path(site, which), layer, np.ascontiguousarray(t)


def adapter_to_release(jax_path: str, array: np.ndarray, layer: int) -> tuple[str, np.ndarray]:
    """One layer of a JAX adapter tensor → (release-style name, [rank, in] or [out, rank])."""
    kernel = jax_path.rsplit(".", 1)[0] + ".kernel"
    which = jax_path.rsplit("_", 1)[1].upper()
    site = _JAX_TO_BLOCK[kernel].rsplit(".", 1)[0]
    a = np.asarray(array)
    flat = a.reshape(-1, a.shape[-1]) if which == "A" else a.reshape(a.shape[0], -1)
    return f"blocks.{layer}.{site}.lora_{which}.weight", np.ascontiguousarray(transpose2d(flat))


# The leaf names of adapter tensors next to their kernel.
LORA_KEYS = ("lora_a", "lora_b")


def adapters_from_release(adapters: dict[str, np.ndarray], config: DiTConfig) -> dict:
    """Nested JAX adapters (stacked over layers) of release-named ones (e.g. a PEFT import);
    every layer of each adapted linear must be there."""
    flat: dict[str, list] = {}
    for name, arr in adapters.items():
        path, layer, a = adapter_to_jax(name, arr, config)
        flat.setdefault(path, [None] * config.depth)[layer] = a
    missing = sorted(p for p, layers in flat.items() if any(x is None for x in layers))
    if missing:
        raise KeyError(f"adapters {missing} lack some of the model's {config.depth} layers")
    return unflatten({k: np.stack(v) for k, v in flat.items()})


def adapters_to_release(adapters: dict) -> dict[str, np.ndarray]:
    """Release-named float32 adapters (mugv/lora.py) of a nested JAX adapter tree (a state's
    `params` or `ema` under LoRA), one layer at a time."""
    out = {}
    for path, arr in flatten(adapters).items():
        if path.rsplit(".", 1)[1] not in LORA_KEYS:
            continue
        for i in range(arr.shape[0]):
            name, a = adapter_to_release(path, np.asarray(arr[i], np.float32), i)
            out[name] = a
    return out
