"""Attention backends against the XLA reference where they can run on the CPU."""

import jax
import jax.numpy as jnp
import pytest

from mugv_jax.parallel import attention

# float32 on the CPU; the kernel sums key blocks in a different order (online softmax).
RTOL = 1e-5
HIGHEST = jax.lax.Precision.HIGHEST


def _inputs(b=2, nq=37, nk=21, h=3, d=72):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, nq, h, d))
    k = jax.random.normal(kk, (b, nk, h, d))
    v = jax.random.normal(kv, (b, nk, h, d))
    # Sample 0: ragged caption mask; sample 1: no valid key at all (must give zeros, not NaN).
    mask = jnp.stack([jnp.arange(nk) % 3 != 1, jnp.zeros(nk, bool)])
    return q, k, v, mask


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_pallas_matches_xla_forward_and_gradients():
    q, k, v, mask = _inputs()
    loss = lambda impl, q, k, v: jnp.sum(
        jnp.sin(attention.dot_product_attention(q, k, v, key_mask=mask, implementation=impl, precision=HIGHEST))
    )
    out_ref = attention.dot_product_attention(q, k, v, key_mask=mask, precision=HIGHEST)
    out = attention.dot_product_attention(q, k, v, key_mask=mask, implementation="pallas", precision=HIGHEST)
    assert out.shape == q.shape and bool(jnp.all(out[1] == 0))
    assert _rel(out, out_ref) <= RTOL
    g_ref = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) <= RTOL
    # Without a mask and with more keys than one block (128): several online-softmax steps.
    q, k, v, _ = _inputs(b=1, nq=40, nk=300, h=2)
    assert (
        _rel(
            attention.dot_product_attention(q, k, v, implementation="pallas"),
            attention.dot_product_attention(q, k, v, precision=HIGHEST),
        )
        <= RTOL
    )


def test_gpu_and_tpu_backends_refuse_the_cpu_clearly():
    q, k, v, mask = _inputs()
    with pytest.raises(RuntimeError, match="attention='cudnn' needs an NVIDIA GPU"):
        attention.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(RuntimeError, match="attention='splash' needs a TPU"):
        attention.dot_product_attention(q, k, v, implementation="splash")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention.dot_product_attention(q, k, v, implementation="flash")


def test_head_dim_72_padding_cost():
    assert attention.head_dim_cost(72) == pytest.approx(128 / 72)  # 1.78x on the 128-lane TPU
    assert attention.head_dim_cost(128) == 1.0
