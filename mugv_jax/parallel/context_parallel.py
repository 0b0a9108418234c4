"""Self-attention with the token sequence split over the mesh axes of the logical `length` axis.

Two schemes, chosen by `RuntimeOptions.context_parallel`:
- "ulysses": one all-to-all turns [sequence shard, all local heads] into [whole sequence, a slice
  of the heads]; any attention backend then runs locally; a second all-to-all turns it back.
  Needs the local head count (heads / tensor degree) divisible by the context degree.
- "ring": queries stay put while K/V blocks (with their key-validity mask) travel around the ring
  with `ppermute`; an online softmax accumulates the result, so no device ever holds more than
  one block of keys. Works for any head count; the XLA einsum is the local kernel.
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
from jax.sharding import PartitionSpec

from mugv_jax.parallel import sharding
from mugv_jax.parallel.attention import dot_product_attention, local_attention

MODES = ("none", "ulysses", "ring")
_QKV_AXES = ("batch", "length", "act_heads", None)


def sequence_multiple() -> int:
    """The token sequence must be padded to a multiple of this (the `length` sharding degree)."""
    return sharding.logical_axis_size("length")


def self_attention(q, k, v, *, key_mask=None, mode: str = "none", implementation: str = "xla", precision=None):
    """Bidirectional self-attention over [batch, length, heads, head_dim], context parallel.

    key_mask marks the model's trailing sequence padding (valid tokens first), so the fused kernels
    take it as sequence lengths for keys and queries alike; padded query rows come out zero.
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
        body = functools.partial(_ulysses, axis=axis, implementation=implementation, precision=precision)
    else:
        body = functools.partial(_ring, axis=axis, degree=degree, precision=precision)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, mask_spec), out_specs=spec, check_vma=False)
    return fn(q, k, v, key_mask)


def _ulysses(q, k, v, key_mask, *, axis, implementation, precision):
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
    )
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _ring(q, k, v, key_mask, *, axis, degree, precision):
    scale = q.shape[-1] ** -0.5
    b, nq, h, d = q.shape
    perm = [(i, (i + 1) % degree) for i in range(degree)]
    # Finite start for the running max: a block whose keys are all masked (padding) then adds
    # exp(-inf - m) = 0 instead of NaN.
    m0 = jnp.full((b, h, nq), -1e30, jnp.float32)
    l0 = jnp.zeros((b, h, nq), jnp.float32)
    o0 = jnp.zeros((b, h, nq, d), jnp.float32)

    def step(carry, _):
        kb, vb, mb, m, l, o = carry
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, kb, precision=precision, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(mb[:, None, None, :], logits, -jnp.inf)
        # The result does not depend on the max (it cancels), so no gradient flows through it.
        m_new = jax.lax.stop_gradient(jnp.maximum(m, logits.max(axis=-1)))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(axis=-1)
        o = o * corr[..., None] + jnp.einsum(
            "bhqk,bkhd->bhqd", p.astype(vb.dtype), vb, precision=precision, preferred_element_type=jnp.float32
        )
        kb, vb, mb = (jax.lax.ppermute(x, axis, perm) for x in (kb, vb, mb))
        return (kb, vb, mb, m_new, l, o), None

    # Recompute each block's scores in the backward pass: only the carries (one K/V block and the
    # running statistics per step) are saved, so memory is O(block²), not O(N²/degree).
    step = jax.checkpoint(step, prevent_cse=False)
    (_, _, _, _, l, o), _ = jax.lax.scan(step, (k, v, key_mask, m0, l0, o0), None, length=degree)
    # Every query sees at least the real tokens, so l > 0.
    return (o / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)
