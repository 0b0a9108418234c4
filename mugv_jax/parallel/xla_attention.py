"""The "xla" attention backend: softmax(q·kᵀ/√d)·v in plain XLA, with a flash-style backward.

The forward materialises the [B, H, Nq, Nk] scores, as a reference should. Autodiff of it would
also keep the probabilities for the backward and run softmax's own backward over them; the custom
VJP keeps only the output and the per-row log-sum-exp, recomputes the probabilities from q and k,
and forms the gradients directly (dv = pᵀg, ds = p·(g·vᵀ − rowsum(g∘o)), dq = ds·k, dk = dsᵀ·q).
On one CPU core that halves the attention's forward+backward (bench/cpu_vs_torch.py), and the
residuals are O(N·d) instead of O(N²). Values are the same math; gradients agree with autodiff to
float32 rounding (tests/mugv_jax/test_attention_backends.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _heads(*xs):
    # [B, N, H, D] ↔ [B, H, N, D]. Inside, everything is heads-major: the batched dots then read
    # and write [N, N] blocks row-major, so XLA moves the O(N·d) operands instead of transposing
    # the [B, H, Nq, Nk] probabilities for the p·v and dsᵀ·q products (on one CPU core the module's
    # forward+backward went from ~40 to ~35 ms at [1, 482, 8, 72]; docs/benchmarks.md).
    return tuple(jnp.swapaxes(x, 1, 2) for x in xs)


def _scores(qh, kh, key_mask, precision):
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, precision=precision, preferred_element_type=F32)
    s = s * qh.shape[-1] ** -0.5
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, :], s, -jnp.inf)
    return s


def _forward(q, k, v, key_mask, precision):
    qh, kh, vh = _heads(q, k, v)
    s = _scores(qh, kh, key_mask, precision)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row with no valid key: every p is 0
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    valid = denom > 0
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vh, precision=precision, preferred_element_type=F32)
    inv = jnp.where(valid, 1.0 / jnp.where(valid, denom, 1.0), 0.0)  # [B, H, Nq, 1]
    (out,) = _heads((out * inv).astype(q.dtype))
    # +inf where nothing is valid: the backward's exp(s − lse) is then 0 for the whole row.
    lse = jnp.where(valid, m + jnp.log(jnp.where(valid, denom, 1.0)), jnp.inf)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, k, v, key_mask, precision):
    """q [B, Nq, H, D], k/v [B, Nk, H, D], key_mask [B, Nk] bool or None → [B, Nq, H, D] in q's
    dtype; float32 scores and softmax; a sample with no valid key gets zeros."""
    return _forward(q, k, v, key_mask, precision)[0]


def _fwd(q, k, v, key_mask, precision):
    out, lse = _forward(q, k, v, key_mask, precision)
    return out, (q, k, v, key_mask, out, lse)


def _bwd(precision, res, g):
    q, k, v, key_mask, out, lse = res
    dot = functools.partial(jnp.einsum, precision=precision, preferred_element_type=F32)
    # Row sums of g∘o as a contraction (mugv_jax/dit/ops.py row_dot says why), [B, H, Nq, 1].
    delta = jnp.einsum(
        "bqhd,bqhd->bhq",
        g.astype(F32),
        out.astype(F32),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=F32,
    )[..., None]
    qh, kh, vh, gh = _heads(q, k, v, g)
    p = jnp.exp(_scores(qh, kh, key_mask, precision) - lse)  # [B, H, Nq, Nk]
    dv = dot("bhqk,bhqd->bhkd", p.astype(g.dtype), gh)
    dp = dot("bhqd,bhkd->bhqk", gh, vh)
    ds = p * (dp - delta) * q.shape[-1] ** -0.5
    dq = dot("bhqk,bhkd->bhqd", ds.astype(k.dtype), kh)
    dk = dot("bhqk,bhqd->bhkd", ds.astype(q.dtype), qh)
    dq, dk, dv = _heads(dq, dk, dv)
    no_grad = None if key_mask is None else jnp.zeros(key_mask.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad


attention.defvjp(_fwd, _bwd)
