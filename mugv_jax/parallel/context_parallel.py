"""Self-attention with the token sequence split over the mesh axes of the logical `length` axis.

Two schemes, chosen by `RuntimeOptions.context_parallel`:
- "ulysses": one all-to-all turns [sequence shard, all local heads] into [whole sequence, a slice
  of the heads]; any attention backend then runs locally; a second all-to-all turns it back.
  Needs the local head count (heads / tensor degree) divisible by the context degree.
- "ring": queries stay put while K/V blocks (with their key-validity mask) travel around the ring
  with `ppermute`. Each step runs the backend's fused kernel on one block and returns its output
  and log-sum-exp, which combine exactly; the backward (a custom VJP) runs the kernel's backward
  per block with the whole ring's output and log-sum-exp, the K/V gradients travelling with their
  block. Only q, k, v, the output and the log-sum-exp are kept: no device ever holds more than
  one block of keys or, for the XLA reference, one block of scores. Works for any head count.
- "none": the XLA SPMD partitioner decides (it all-gathers K/V over the sequence shards).

The model pads the token sequence to a multiple of the context degree and passes a key mask that
excludes the padding; RoPE tables are computed for the padded global sequence and sharded like
the tokens, so each shard rotates by its own positions. Cross-attention needs nothing here: its
queries are sharded over `length` and the caption keys are replicated, so it is local.
The mesh comes from the enclosing `sharding.activation_sharding`; model code names only logical
axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from mugv_jax.parallel import sharding
from mugv_jax.parallel.attention import RingStep, dot_product_attention, local_attention, ring_step

MODES = ("none", "ulysses", "ring")
_QKV_AXES = ("batch", "length", "act_heads", None)


def sequence_multiple() -> int:
    """The token sequence must be padded to a multiple of this (the `length` sharding degree)."""
    return sharding.logical_axis_size("length")


def self_attention(
    q,
    k,
    v,
    *,
    key_mask=None,
    mode: str = "none",
    implementation: str = "xla",
    precision=None,
    residual_name: str | None = None,
):
    """Bidirectional self-attention over [batch, length, heads, head_dim], context parallel.

    key_mask marks the model's trailing sequence padding (valid tokens first), so the fused kernels
    take it as sequence lengths for keys and queries alike; padded query rows come out zero.
    residual_name tags what the kernels (and the ring) keep for the backward, for remat policies.
    """
    if mode not in MODES:
        raise ValueError(f"unknown context_parallel mode {mode!r}; choose from {MODES}")
    ctx = sharding.current_context()
    degree = sequence_multiple()
    if mode == "none" or ctx is None or degree == 1:
        return dot_product_attention(
            q,
            k,
            v,
            key_mask=key_mask,
            implementation=implementation,
            precision=precision,
            key_mask_prefix=True,
            pad_queries=True,
            residual_name=residual_name,
        )
    mesh, rules = ctx
    if q.shape[1] % degree:
        raise ValueError(
            f"context parallel: sequence length {q.shape[1]} is not a multiple of the "
            f"context degree {degree} (the model pads it; pass padded inputs)"
        )
    spec = sharding.spec_for_shape(q.shape, _QKV_AXES, mesh, rules)
    axes = sharding.mesh_axes_for("length", mesh, rules)
    axis = axes[0] if len(axes) == 1 else axes
    mask_spec = PartitionSpec(spec[0], spec[1])
    if key_mask is None:
        key_mask = jnp.ones(q.shape[:2], bool)
    if mode == "ulysses":
        tensor_entry = spec[2]
        tensor_axes = (
            () if tensor_entry is None else ((tensor_entry,) if isinstance(tensor_entry, str) else tuple(tensor_entry))
        )
        local_heads = q.shape[2]
        for a in tensor_axes:
            local_heads //= mesh.shape[a]
        if local_heads % degree:
            raise ValueError(
                f"context_parallel='ulysses' splits the {local_heads} heads per tensor shard over the "
                f"context degree {degree}, which does not divide them; use 'ring' or change mesh.ici"
            )
        body = functools.partial(
            _ulysses, axis=axis, implementation=implementation, precision=precision, residual_name=residual_name
        )
    else:
        body = functools.partial(
            _ring, axis=axis, degree=degree, step=ring_step(implementation), precision=precision, name=residual_name
        )
    fn = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, mask_spec), out_specs=spec, check_vma=False)
    return fn(q, k, v, key_mask)


def _ulysses(q, k, v, key_mask, *, axis, implementation, precision, residual_name):
    # [b, n/c, h, d] → [b, n, h/c, d]: chunks are concatenated in device order = sequence order.
    to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
    full_mask = jax.lax.all_gather(key_mask, axis, axis=1, tiled=True)
    out = local_attention(
        to_heads(q),
        to_heads(k),
        to_heads(v),
        key_mask=full_mask,
        implementation=implementation,
        precision=precision,
        key_mask_prefix=True,
        pad_queries=True,
        residual_name=residual_name,
    )
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _ring(q, k, v, key_mask, *, axis, degree, step: RingStep, precision, name):
    out = _ring_attention(q, k, v, key_mask, axis, degree, step, precision, name)
    # Padded positions are not queries: zero rows, as from the other schemes.
    return jnp.where(key_mask[:, :, None, None], out, jnp.zeros_like(out))


def _shift(axis, degree, *xs):
    perm = [(i, (i + 1) % degree) for i in range(degree)]
    return tuple(jax.lax.ppermute(x, axis, perm) for x in xs)


def _combine(lse, o, lse_i, o_i):
    """Merge a block's (lse_i, o_i) into the running (lse, o): exact softmax over the union."""
    new = jnp.logaddexp(lse, lse_i)
    finite = jnp.isfinite(new)
    weight = lambda x: jnp.where(finite, jnp.exp(x - jnp.where(finite, new, 0.0)), 0.0).transpose(0, 2, 1)[..., None]
    return new, o * weight(lse) + o_i.astype(jnp.float32) * weight(lse_i)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _ring_attention(q, k, v, key_mask, axis, degree, step, precision, name):
    return _ring_forward(q, k, v, key_mask, axis, degree, step, precision)[0]


def _ring_forward(q, k, v, key_mask, axis, degree, step, precision):
    b, nq, h, d = q.shape

    def body(carry, _):
        kb, vb, mb, lse, o = carry
        o_i, lse_i = step.forward(q, kb, vb, mb, precision)
        lse, o = _combine(lse, o, lse_i, o_i)
        return (*_shift(axis, degree, kb, vb, mb), lse, o), None

    init = (k, v, key_mask, jnp.full((b, h, nq), -jnp.inf, jnp.float32), jnp.zeros(q.shape, jnp.float32))
    (_, _, _, lse, o), _ = jax.lax.scan(body, init, None, length=degree)
    return o.astype(q.dtype), lse


def _ring_fwd(q, k, v, key_mask, axis, degree, step, precision, name):
    out, lse = _ring_forward(q, k, v, key_mask, axis, degree, step, precision)
    if name:  # what the backward keeps, visible to a named remat policy
        out, lse = checkpoint_name(out, name), checkpoint_name(lse, name)
    return out, (q, k, v, key_mask, out, lse)


def _ring_bwd(axis, degree, step, precision, name, res, dout):
    q, k, v, key_mask, out, lse = res

    def body(carry, _):
        kb, vb, mb, dk, dv, dq = carry
        dq_i, dk_i, dv_i = step.backward(q, kb, vb, mb, out, lse, dout, precision)
        # A block's K/V gradients travel with it and are home after `degree` shifts.
        dk, dv = dk + dk_i.astype(jnp.float32), dv + dv_i.astype(jnp.float32)
        return (*_shift(axis, degree, kb, vb, mb, dk, dv), dq + dq_i.astype(jnp.float32)), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    init = (k, v, key_mask, zeros(k), zeros(v), zeros(q))
    (_, _, _, dk, dv, dq), _ = jax.lax.scan(body, init, None, length=degree)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_attention.defvjp(_ring_fwd, _ring_bwd)
