"""Logical axis names and the one table that maps them to mesh axes.

Model code names the axes of every parameter (and the activations it constrains) with logical
names only; this table decides which mesh axis (data, fsdp, tensor, context) shards each. Changing
a parallelism strategy means editing the rules, never the model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical name → mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    # parameters
    ("layers", None),  # stacked-layer axis: every device holds all layers' shards
    ("embed", "fsdp"),  # hidden size: FSDP shards parameters along it
    ("mlp", "tensor"),  # MLP hidden / conditioning projections: tensor parallel
    ("heads", "tensor"),  # attention heads: tensor parallel
    ("head_dim", None),
    ("qkv", None),  # the q/k/v (or k/v) selector of fused projections
    ("modulation", None),  # the 6 (or 2) AdaLN chunks of a scale-shift table
    ("text_embed", None),  # text-encoder feature width (4096)
    ("frequency", None),  # sinusoidal feature width (256)
    ("patch", None),  # patch kernel axes and per-patch output features
    ("channels", None),  # latent channels
    ("conv_in", None),  # VAE convolution input / output channels
    ("conv_out", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "context"),  # video token axis: context parallel
    ("text_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)

_state = threading.local()


def rules_dict(rules: Iterable[tuple[str, object]] = DEFAULT_RULES) -> dict[str, object]:
    return dict(rules)


def rules_with(overrides: Iterable[tuple[str, object]] = ()) -> tuple[tuple[str, object], ...]:
    """DEFAULT_RULES with rows replaced by `overrides` (`config.sharding_rules`: (logical axis,
    mesh axis | (mesh axes…) | None) entries). The table stays the one default; a run may change
    how a logical axis is sharded, not invent axes the model does not name."""
    table = rules_dict()
    for name, target in overrides:
        where = f"--config.sharding_rules entry ({name!r}, {target!r})"
        if name not in table:
            raise ValueError(f"{where}: no logical axis {name!r}; the model's axes are {sorted(table)}")
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"{where}: {bad} are not mesh axes {MESH_AXES}")
        table[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return tuple(table.items())


def logical_to_spec(logical_axes: Sequence[str | None], rules=DEFAULT_RULES, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names; mesh axes absent from `mesh` (or of size 1) are dropped."""
    table = rules_dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to mugv_jax.parallel.sharding rules")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        # A mesh axis may shard at most one dimension of a tensor.
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def spec_for_shape(
    shape: Sequence[int], logical_axes: Sequence[str | None] | None, mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """Like logical_to_spec, but a mesh axis is dropped where the dimension does not divide by it
    (e.g. 2 heads over tensor=4): that dimension is replicated instead of failing."""
    if logical_axes is None:
        return PartitionSpec()
    spec = logical_to_spec(logical_axes, rules, mesh)
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, size = [], 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
    """Within this context, `constrain` pins activations to the mesh by their logical names."""
    prev = getattr(_state, "ctx", None)
    _state.ctx = (mesh, rules)
    try:
        yield
    finally:
        _state.ctx = prev


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activation_sharding`."""
    ctx = getattr(_state, "ctx", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for_shape(x.shape, logical_axes, mesh, rules)))


def current_context():
    """(mesh, rules) of the enclosing `activation_sharding`, or None."""
    return getattr(_state, "ctx", None)


def mesh_axes_for(logical_name: str, mesh: Mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes (present and larger than 1) that shard a logical axis under the rules."""
    entry = logical_to_spec((logical_name,), rules, mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def logical_axis_size(logical_name: str) -> int:
    """How many ways the enclosing `activation_sharding` splits a logical axis (1 outside one)."""
    ctx = current_context()
    if ctx is None:
        return 1
    mesh, rules = ctx
    size = 1
    for a in mesh_axes_for(logical_name, mesh, rules):
        size *= mesh.shape[a]
    return size


def param_logical_axes(module) -> dict[str, tuple]:
    """{dotted param path: logical axes} for every nnx.Param of a module."""
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        out[".".join(str(p) for p in path)] = var.get_metadata().get("logical_axes")
    return out
