"""Blockwise attention in plain XLA with a fused kernel's memory profile (backend "chunked").

The forward walks the keys in blocks with an online softmax and returns the output and the
log-sum-exp of the scaled scores; the backward recomputes each block's probabilities from that
log-sum-exp (FlashAttention-2's backward). Queries are blocked too, so only q, k, v, the output
and the log-sum-exp are kept for the backward (O(N·d) residuals) and the scores exist one
[batch, heads, Q_BLOCK, BLOCK] tile at a time, however long the sequence: never the N² scores.
That is what splash and cuDNN keep (their tiles live in VMEM/SRAM), so the planner compiles this
in their place on the CPU (mugv_jax/plan.py), and the ring of
mugv_jax/parallel/context_parallel.py uses `forward`/`backward` as the step of any backend that
returns the log-sum-exp.

Layouts: q [B, Nq, H, D], k/v [B, Nk, H, D], key_mask [B, Nk] bool, lse [B, H, Nq] float32
(natural log; -inf for a query with no valid key, whose output row is zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

BLOCK = 512  # keys per block
Q_BLOCK = 1024  # queries per block: score temporaries are [B, H, Q_BLOCK, BLOCK] float32


def _split(x, block, axis=1, fill=0):
    """x padded along `axis` to a multiple of `block` and split into [n_blocks, ..., block, ...]."""
    n = x.shape[axis]
    block = min(block, n)
    pad = -n % block
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape(*x.shape[:axis], (n + pad) // block, block, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, n, axis=1):
    """Inverse of `_split`: [n_blocks, ..., block, ...] → the first n along `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)


def _scores(q, kb, mb, scale, precision):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kb, precision=precision, preferred_element_type=jnp.float32) * scale
    return jnp.where(mb[:, None, None, :], s, -jnp.inf)


def _forward_block(q, kb, vb, mb, scale, precision):
    """One block of queries against every key block: (out [B, q, H, D] float32, lse [B, H, q])."""
    b, nq, h, d = q.shape

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
            "bhqk,bkhd->bhqd", p.astype(vj.dtype), vj, precision=precision, preferred_element_type=jnp.float32
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
    return out.transpose(0, 2, 1, 3), lse


def forward(q, k, v, key_mask, *, precision=None, block: int = BLOCK, q_block: int = Q_BLOCK):
    """(output [B, Nq, H, D] in q's dtype, lse [B, H, Nq] float32)."""
    nq = q.shape[1]
    scale = q.shape[-1] ** -0.5
    kb, vb, mb = _split(k, block), _split(v, block), _split(key_mask, block, fill=False)
    out, lse = jax.lax.map(lambda qi: _forward_block(qi, kb, vb, mb, scale, precision), _split(q, q_block))
    return _merge(out, nq).astype(q.dtype), _merge(lse, nq, axis=2)


def backward(q, k, v, key_mask, out, lse, dout, *, precision=None, block: int = BLOCK, q_block: int = Q_BLOCK):
    """(dq, dk, dv) of sum(out · dout), given the forward's output and log-sum-exp. `out` and
    `lse` may be those of a larger attention this block of keys is part of (a ring step): the
    probabilities exp(s - lse) are then the global ones and the gradients sum over blocks."""
    nq, nk = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5
    kb, vb, mb = _split(k, block), _split(v, block), _split(key_mask, block, fill=False)
    # D_i = rowsum(dO ⊙ O), [B, H, Nq]
    di = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # no valid key: p = 0
    q_blocks = (_split(q, q_block), _split(dout, q_block))
    q_blocks += (_split(lse, q_block, axis=2), _split(di, q_block, axis=2))

    def per_query_block(dkv, qblk):
        qi, doi, lsei, dii = qblk

        def per_key_block(dq, blk):
            kj, vj, mj = blk
            p = jnp.exp(_scores(qi, kj, mj, scale, precision) - lsei[..., None])
            dv = jnp.einsum(
                "bhqk,bqhd->bkhd", p.astype(doi.dtype), doi, precision=precision, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqhd,bkhd->bhqk", doi, vj, precision=precision, preferred_element_type=jnp.float32)
            ds = p * (dp - dii[..., None])
            dq = dq + jnp.einsum(
                "bhqk,bkhd->bqhd", ds.astype(kj.dtype), kj, precision=precision, preferred_element_type=jnp.float32
            )
            dk = jnp.einsum(
                "bhqk,bqhd->bkhd", ds.astype(qi.dtype), qi, precision=precision, preferred_element_type=jnp.float32
            )
            return dq, (dk, dv)

        dq, (dk, dv) = jax.lax.scan(per_key_block, jnp.zeros(qi.shape, jnp.float32), (kb, vb, mb))
        return (dkv[0] + dk, dkv[1] + dv), dq

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(per_query_block, (zeros, zeros), q_blocks)
    return (
        (_merge(dq, nq) * scale).astype(q.dtype),
        (_merge(dk, nk) * scale).astype(k.dtype),
        _merge(dv, nk).astype(v.dtype),
    )


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
