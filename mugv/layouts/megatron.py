"""The Megatron-Core parameter layout and its exact map to and from the release layout.

Megatron names follow the reference trainer (docs/reference.md §4.6): per-layer tensors live
under `decoder.layers.{i}.`, the embedders are renamed (`t_embedder` → `timestep_embedder`,
`t_block` → `timestep_block`, `y_embedder.y_proj` → `context_embedder.proj`), and the
scale-shift tables carry a `.bias` suffix. Two tensors change layout as well as name: the fused
self-attention QKV is regrouped per head, release rows [Q(all heads) | K | V] becoming
[q_0 k_0 v_0 | q_1 k_1 v_1 | …], and the cross-attention KV likewise becomes [k_h v_h] per head.
That grouping is what makes Megatron's contiguous column split give every tensor-parallel rank
whole heads.

Everything here is a pure reshape/swap/slice, so conversions are bit-exact both ways. Only
`reshape`, `swapaxes`, `shape` and basic slicing are used on the arrays, which numpy arrays and
torch tensors share; torch is never imported, and a bfloat16 torch tensor keeps its dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from mugv.config import DiTConfig
from mugv.schema import Shape, release_schema

Array = Any  # numpy.ndarray or torch.Tensor: anything with reshape / swapaxes / slicing

LAYER_PREFIX = "decoder.layers."
EXTRA_STATE_SUFFIX = "._extra_state"

# Release name → Megatron name for tensors outside the blocks; the layout is unchanged.
_GLOBAL_NAMES: dict[str, str] = {
    "start_token": "start_token",
    "end_token": "end_token",
    "x_embedder.proj.weight": "x_embedder.proj.weight",
    "x_embedder.proj.bias": "x_embedder.proj.bias",
    "t_block.1.weight": "timestep_block.1.weight",
    "t_block.1.bias": "timestep_block.1.bias",
    "y_embedder.y_proj.fc1.weight": "context_embedder.proj.fc1.weight",
    "y_embedder.y_proj.fc1.bias": "context_embedder.proj.fc1.bias",
    "y_embedder.y_proj.fc2.weight": "context_embedder.proj.fc2.weight",
    "y_embedder.y_proj.fc2.bias": "context_embedder.proj.fc2.bias",
    # The null caption for classifier-free guidance: not in the released dit.pt, but a
    # checkpoint of ours may carry it.
    "y_embedder.y_embedding": "context_embedder.drop_emb",
    "final_layer.scale_shift_table": "final_layer.scale_shift_table.bias",
    "final_layer.linear.weight": "final_layer.linear.weight",
    "final_layer.linear.bias": "final_layer.linear.bias",
}
for _src, _dst in (("t_embedder", "timestep_embedder"), ("fps_embedder", "fps_embedder")):
    for _lin in ("0", "2"):
        for _kind in ("weight", "bias"):
            _GLOBAL_NAMES[f"{_src}.mlp.{_lin}.{_kind}"] = f"{_dst}.mlp.{_lin}.{_kind}"

# Release suffix after `blocks.{i}.` → Megatron suffix after `decoder.layers.{i}.`.
_BLOCK_NAMES: dict[str, str] = {
    "scale_shift_table": "scale_shift_table.bias",
    "attn.qkv.weight": "self_attention.linear_qkv.weight",
    "attn.qkv.bias": "self_attention.linear_qkv.bias",
    "attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "attn.proj.weight": "self_attention.linear_proj.weight",
    "attn.proj.bias": "self_attention.linear_proj.bias",
    "cross_attn_norm.weight": "pre_cross_attn_layernorm.weight",
    "cross_attn_norm.bias": "pre_cross_attn_layernorm.bias",
    "cross_attn.q_linear.weight": "cross_attention.linear_q.weight",
    "cross_attn.q_linear.bias": "cross_attention.linear_q.bias",
    "cross_attn.kv_linear.weight": "cross_attention.linear_kv.weight",
    "cross_attn.kv_linear.bias": "cross_attention.linear_kv.bias",
    "cross_attn.q_norm.weight": "cross_attention.q_layernorm.weight",
    "cross_attn.k_norm.weight": "cross_attention.k_layernorm.weight",
    "cross_attn.proj.weight": "cross_attention.linear_proj.weight",
    "cross_attn.proj.bias": "cross_attention.linear_proj.bias",
    "mlp.fc1.weight": "mlp.linear_fc1.weight",
    "mlp.fc1.bias": "mlp.linear_fc1.bias",
    "mlp.fc2.weight": "mlp.linear_fc2.weight",
    "mlp.fc2.bias": "mlp.linear_fc2.bias",
}

# Megatron suffixes whose rows are regrouped per head, with the number of fused projections.
_PER_HEAD_FUSED: dict[str, int] = {
    "self_attention.linear_qkv.weight": 3,
    "self_attention.linear_qkv.bias": 3,
    "cross_attention.linear_kv.weight": 2,
    "cross_attention.linear_kv.bias": 2,
}

# Tensor-parallel split rule per Megatron suffix (docs/reference.md §4.6); everything else is
# replicated on every rank.
_COLUMN_PARALLEL = frozenset(
    {
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "cross_attention.linear_q.weight",
        "cross_attention.linear_q.bias",
        "cross_attention.linear_kv.weight",
        "cross_attention.linear_kv.bias",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc1.bias",
    }
)
_ROW_PARALLEL = frozenset(
    {
        "self_attention.linear_proj.weight",
        "cross_attention.linear_proj.weight",
        "mlp.linear_fc2.weight",
    }
)

_MEGATRON_TO_GLOBAL = {m: r for r, m in _GLOBAL_NAMES.items()}
_MEGATRON_TO_BLOCK = {m: r for r, m in _BLOCK_NAMES.items()}
_RELEASE_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MEGATRON_LAYER = re.compile(r"^" + re.escape(LAYER_PREFIX) + r"(\d+)\.(.+)$")

SplitRule = Literal["column", "row", "replicated"]


# ---------------------------------------------------------------------------------------------
# Per-head regrouping of fused projections


def _check_fused_rows(name: str, array: Array, fused: int, config: DiTConfig) -> None:
    rows = fused * config.hidden_size
    if array.shape[0] != rows:
        raise ValueError(
            f"{name}: expected {rows} rows ({fused} x hidden {config.hidden_size}) to regroup "
            f"per head, got shape {list(array.shape)}"
        )


def group_per_head(array: Array, fused: int, config: DiTConfig) -> Array:
    """Release rows (n, head, c) → Megatron rows (head, n, c) on dim 0; n runs over q/k/v or k/v."""
    h, d = config.num_heads, config.head_dim
    rest = tuple(array.shape[1:])
    return array.reshape(fused, h, d, *rest).swapaxes(0, 1).reshape(fused * h * d, *rest)


def ungroup_per_head(array: Array, fused: int, config: DiTConfig) -> Array:
    """Megatron rows (head, n, c) → release rows (n, head, c): the inverse of `group_per_head`."""
    h, d = config.num_heads, config.head_dim
    rest = tuple(array.shape[1:])
    return array.reshape(h, fused, d, *rest).swapaxes(0, 1).reshape(fused * h * d, *rest)


# ---------------------------------------------------------------------------------------------
# Names


def split_layer(name: str) -> tuple[int | None, str]:
    """(layer, suffix) of `decoder.layers.<i>.<suffix>`, (None, name) for other names."""
    m = _MEGATRON_LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def layer_name(layer: int, suffix: str) -> str:
    """`decoder.layers.<layer>.<suffix>`, the inverse of `split_layer`."""
    return f"{LAYER_PREFIX}{layer}.{suffix}"


def megatron_name(release_name: str) -> str:
    """The Megatron name of a release tensor; KeyError naming the tensor if it has none."""
    m = _RELEASE_BLOCK.match(release_name)
    if m:
        suffix = _BLOCK_NAMES.get(m.group(2))
        if suffix is not None:
            return f"{LAYER_PREFIX}{m.group(1)}.{suffix}"
    elif release_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[release_name]
    raise KeyError(f"release tensor {release_name!r} has no Megatron counterpart")


def release_name(megatron_name_: str) -> str:
    """The release name of a Megatron tensor; KeyError naming the tensor if it has none."""
    layer, suffix = split_layer(megatron_name_)
    if layer is not None:
        if suffix in _MEGATRON_TO_BLOCK:
            return f"blocks.{layer}.{_MEGATRON_TO_BLOCK[suffix]}"
    elif suffix in _MEGATRON_TO_GLOBAL:
        return _MEGATRON_TO_GLOBAL[suffix]
    raise KeyError(f"Megatron tensor {megatron_name_!r} has no release counterpart")


def megatron_schema(config: DiTConfig) -> dict[str, Shape]:
    """Every Megatron tensor (full, un-split shapes) of the model described by `config`."""
    return {megatron_name(name): shape for name, shape in release_schema(config).items()}


# ---------------------------------------------------------------------------------------------
# Per-tensor conversion


def release_to_megatron(name: str, array: Array, config: DiTConfig) -> list[tuple[str, Array]]:
    """One release tensor → its Megatron tensor(s), full (un-split) shape."""
    target = megatron_name(name)
    _, suffix = split_layer(target)
    fused = _PER_HEAD_FUSED.get(suffix)
    if fused is not None:
        _check_fused_rows(name, array, fused, config)
        array = group_per_head(array, fused, config)
    return [(target, array)]


def megatron_to_release(name: str, array: Array, config: DiTConfig) -> list[tuple[str, Array]]:
    """One full (un-split) Megatron tensor → its release tensor(s).

    Transformer Engine's `_extra_state` placeholders carry no weights and map to nothing.
    """
    if name.endswith(EXTRA_STATE_SUFFIX):
        return []
    target = release_name(name)
    _, suffix = split_layer(name)
    fused = _PER_HEAD_FUSED.get(suffix)
    if fused is not None:
        _check_fused_rows(name, array, fused, config)
        array = ungroup_per_head(array, fused, config)
    return [(target, array)]


def release_state_to_megatron(state: dict[str, Array], config: DiTConfig) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for name, array in state.items():
        out.update(release_to_megatron(name, array, config))
    return out


def megatron_state_to_release(state: dict[str, Array], config: DiTConfig) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for name, array in state.items():
        out.update(megatron_to_release(name, array, config))
    return out


# ---------------------------------------------------------------------------------------------
# Tensor parallelism


def tp_split_rule(name: str) -> SplitRule:
    """How Megatron shards `name` over tensor-parallel ranks: column (dim 0), row (dim 1) or not."""
    _, suffix = split_layer(name)
    if suffix in _COLUMN_PARALLEL:
        return "column"
    if suffix in _ROW_PARALLEL:
        return "row"
    return "replicated"


def _split_dim(name: str, array: Array, tp: int) -> int | None:
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
    rule = tp_split_rule(name)
    if rule == "replicated":
        return None
    dim = 0 if rule == "column" else 1
    if len(array.shape) <= dim or array.shape[dim] % tp:
        raise ValueError(
            f"{name}: shape {list(array.shape)} cannot be split {rule}-parallel over {tp} ranks "
            f"(dim {dim} must divide by {tp})"
        )
    return dim


def tp_shard(name: str, array: Array, rank: int, tp: int) -> Array:
    """Rank `rank`'s shard of the full Megatron tensor `name` under tensor-parallel size `tp`.

    Column-parallel tensors are cut contiguously along dim 0 (after the per-head regrouping, so
    a rank owns whole heads), row-parallel weights along dim 1; all else is returned whole.
    """
    if not 0 <= rank < tp:
        raise ValueError(f"tensor-parallel rank {rank} is outside [0, {tp})")
    dim = _split_dim(name, array, tp)
    if dim is None:
        return array
    size = array.shape[dim] // tp
    if dim == 0:
        return array[rank * size : (rank + 1) * size]
    return array[:, rank * size : (rank + 1) * size]


def tp_merge(name: str, shards: Iterable[Array], concat) -> Array:
    """Inverse of `tp_shard`: rebuild the full tensor from all ranks' shards, in rank order.

    `concat(list_of_arrays, axis)` is the framework's concatenation (`numpy.concatenate`, or a
    wrapper of `torch.cat`), passed in so this module stays framework-free.
    """
    shards = list(shards)
    rule = tp_split_rule(name)
    if rule == "replicated":
        return shards[0]
    return concat(shards, 0 if rule == "column" else 1)


def iter_tp_shards(state: dict[str, Array], rank: int, tp: int) -> Iterator[tuple[str, Array]]:
    for name, array in state.items():
        yield name, tp_shard(name, array, rank, tp)
