"""Blockwise attention in plain XLA with a fused kernel's memory profile (backend "chunked").

The forward walks the keys in blocks with an online softmax and returns the output and the
log-sum-exp of the scaled scores; the backward recomputes each block's probabilities from that
log-sum-exp (FlashAttention-2's backward). Only q, k, v, the output and the log-sum-exp are kept
for the backward: O(N·d) residuals and one [batch, heads, queries, block] score block at a time,
never the N² scores. That is what splash and cuDNN keep, so the planner compiles this in their
place on the CPU (mugv_jax/plan.py), and the ring of mugv_jax/parallel/context_parallel.py uses
`forward`/`backward` as the step of any backend that returns the log-sum-exp.

Layouts: q [B, Nq, H, D], k/v [B, Nk, H, D], key_mask [B, Nk] bool, lse [B, H, Nq] float32
(natural log; -inf for a query with no valid key, whose output row is zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

BLOCK = 512  # keys per block: score temporaries are [B, H, Nq, BLOCK] float32


def _blocks(k, v, key_mask, block):
    """k, v, mask split into [n_blocks, B, block, ...] (keys padded with masked zeros)."""
    nk = k.shape[1]
    block = min(block, nk)
    pad = -nk % block
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        key_mask = jnp.pad(key_mask, ((0, 0), (0, pad)))
    n = (nk + pad) // block
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)
    return split(k), split(v), split(key_mask), block


def _scores(q, kb, mb, scale, precision):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kb, precision=precision, preferred_element_type=jnp.float32) * scale
    return jnp.where(mb[:, None, None, :], s, -jnp.inf)


def forward(q, k, v, key_mask, *, precision=None, block: int = BLOCK):
    """(output [B, Nq, H, D] in q's dtype, lse [B, H, Nq] float32)."""
    b, nq, h, d = q.shape
    scale = d**-0.5
    kb, vb, mb, _ = _blocks(k, v, key_mask, block)

    def step(carry, blk):
        m, l, acc = carry
        kj, vj, mj = blk
        s = _scores(q, kj, mj, scale, precision)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # Rows with no valid key so far keep m = -inf; shift by 0 so exp gives 0, not NaN.
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - shift[..., None])
        corr = jnp.exp(m - shift)
        pv = jnp.einsum(
            "bhqk,bkhd->bhqd", p.astype(v.dtype), vj, precision=precision, preferred_element_type=jnp.float32
        )
        return (m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv), None

    init = (
        jnp.full((b, h, nq), -jnp.inf, jnp.float32),
        jnp.zeros((b, h, nq), jnp.float32),
        jnp.zeros((b, h, nq, d), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, mb))
    valid = l > 0
    lse = jnp.where(valid, m + jnp.log(jnp.where(valid, l, 1.0)), -jnp.inf)
    out = jnp.where(valid[..., None], acc / jnp.where(valid, l, 1.0)[..., None], 0.0)
    return out.transpose(0, 2, 1, 3).astype(q.dtype), lse


def backward(q, k, v, key_mask, out, lse, dout, *, precision=None, block: int = BLOCK):
    """(dq, dk, dv) of sum(out · dout), given the forward's output and log-sum-exp. `out` and
    `lse` may be those of a larger attention this block of keys is part of (a ring step): the
    probabilities exp(s - lse) are then the global ones and the gradients sum over blocks."""
    nk = k.shape[1]
    scale = q.shape[-1] ** -0.5
    kb, vb, mb, blk_len = _blocks(k, v, key_mask, block)
    # D_i = rowsum(dO ⊙ O), [B, H, Nq]
    di = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # no valid key: p = 0

    def step(dq, blk):
        kj, vj, mj = blk
        p = jnp.exp(_scores(q, kj, mj, scale, precision) - lse_safe[..., None])
        dv = jnp.einsum(
            "bhqk,bqhd->bkhd", p.astype(dout.dtype), dout, precision=precision, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("bqhd,bkhd->bhqk", dout, vj, precision=precision, preferred_element_type=jnp.float32)
        ds = p * (dp - di[..., None])
        dq = dq + jnp.einsum(
            "bhqk,bkhd->bqhd", ds.astype(kj.dtype), kj, precision=precision, preferred_element_type=jnp.float32
        )
        dk = jnp.einsum(
            "bhqk,bqhd->bkhd", ds.astype(q.dtype), q, precision=precision, preferred_element_type=jnp.float32
        )
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (kb, vb, mb))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :nk]
    return (dq * scale).astype(q.dtype), (merge(dk) * scale).astype(k.dtype), merge(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def attention(q, k, v, key_mask, precision=None, block: int = BLOCK, name: str | None = None):
    """softmax(q·kᵀ/√d)·v over valid keys; a query with no valid key gets zeros. `name` tags the
    output and log-sum-exp kept for the backward (`checkpoint_name`), so a remat policy can save
    them instead of recomputing the forward."""
    return forward(q, k, v, key_mask, precision=precision, block=block)[0]


def _attention_fwd(q, k, v, key_mask, precision, block, name):
    out, lse = forward(q, k, v, key_mask, precision=precision, block=block)
    if name:  # one tagged output: the primal result and the residual are the same saved array
        out, lse = checkpoint_name(out, name), checkpoint_name(lse, name)
    return out, (q, k, v, key_mask, out, lse)


def _attention_bwd(precision, block, name, res, dout):
    q, k, v, key_mask, out, lse = res
    dq, dk, dv = backward(q, k, v, key_mask, out, lse, dout, precision=precision, block=block)
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)
