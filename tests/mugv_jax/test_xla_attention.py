"""The "xla" attention backend's flash-style backward against autodiff of the plain formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mugv_jax.parallel import attention, xla_attention

HIGHEST = jax.lax.Precision.HIGHEST
# float32: the same math, summed in another order (measured ≤ 2e-7 relative to each tensor's max).
F32_REL = 1e-5
# bfloat16 inputs: both sides round p and ds to bf16 before their dots, at different points.
BF16_REL = 2e-2


def _plain(q, k, v, key_mask, precision):
    """softmax(q·kᵀ/√d)·v as autodiff sees it: probabilities kept for the backward."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    s = s * q.shape[-1] ** -0.5
    valid = jnp.any(key_mask, axis=-1)[:, None, None, None]
    s = jnp.where(valid, jnp.where(key_mask[:, None, None, :], s, -jnp.inf), 0.0)
    p = jnp.where(valid, jax.nn.softmax(s, axis=-1), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _inputs(dtype=jnp.float32, b=3, nq=37, nk=21, h=2, d=72):
    rng = np.random.default_rng(1)
    q, k, v, g = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for n in (nq, nk, nk, nq))
    # A ragged mask, a padding (prefix) mask, and a sample with no valid key (zeros, not NaN).
    mask = jnp.asarray(np.stack([np.arange(nk) % 3 != 1, np.arange(nk) < 15, np.zeros(nk, bool)]))
    return q, k, v, g, mask


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _vjp(fn, q, k, v, g, mask, precision):
    # Unoptimised LLVM: these are tiny, the compile is the cost.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(q, k, v, g, mask):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, precision), q, k, v)
        return out, vjp(g)

    return run(q, k, v, g, mask)


def test_forward_and_gradients_match_autodiff_float32_and_bfloat16():
    for dtype, precision, bound in ((jnp.float32, HIGHEST, F32_REL), (jnp.bfloat16, None, BF16_REL)):
        q, k, v, g, mask = _inputs(dtype)
        out, grads = _vjp(xla_attention.attention, q, k, v, g, mask, precision)
        want, want_grads = _vjp(_plain, q, k, v, g, mask, precision)
        assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
        assert _rel(out, want) <= bound, dtype
        assert bool(jnp.all(out[2] == 0)) and all(bool(jnp.all(x[2] == 0)) for x in grads)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
        for got, ref in zip(grads, want_grads):
            assert _rel(got, ref) <= bound, dtype
    # No mask at all (self-attention without padding), through the backend dispatch.
    q, k, v, g, _ = _inputs(nk=37)
    backend = lambda q, k, v, m, p: attention.dot_product_attention(q, k, v, precision=p)
    out, grads = _vjp(backend, q, k, v, g, None, HIGHEST)
    want, want_grads = _vjp(_plain, q, k, v, g, np.ones((3, 37), bool), HIGHEST)
    assert _rel(out, want) <= F32_REL and all(_rel(a, b) <= F32_REL for a, b in zip(grads, want_grads))


def test_backward_keeps_no_score_sized_residual():
    """What the VJP closes over is O(N·d): no [B, H, Nq, Nk] array survives the forward."""
    q, k, v, _, mask = _inputs(nq=64, nk=48)

    def residual_sizes(fn):
        jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(lambda *a: fn(*a, mask, HIGHEST), q, k, v)[1])(q, k, v)
        return [int(np.prod(a.aval.shape)) for a in jaxpr.jaxpr.outvars]

    assert max(residual_sizes(xla_attention.attention)) <= q.size
    assert max(residual_sizes(_plain)) >= 3 * 2 * 64 * 48  # autodiff keeps the probabilities
