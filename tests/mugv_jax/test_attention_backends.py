"""Attention backends that cannot run on the CPU say so; what each kernel costs at head dim 72.

(The kernels against the XLA reference: tests/mugv_jax/test_fused_attention.py.)"""

import jax
import jax.numpy as jnp
import pytest

from mugv_jax.parallel import attention


def _inputs(b=2, nq=37, nk=21, h=3, d=72):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, nq, h, d))
    k = jax.random.normal(kk, (b, nk, h, d))
    v = jax.random.normal(kv, (b, nk, h, d))
    # Sample 0: ragged caption mask; sample 1: no valid key at all (must give zeros, not NaN).
    mask = jnp.stack([jnp.arange(nk) % 3 != 1, jnp.zeros(nk, bool)])
    return q, k, v, mask


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
