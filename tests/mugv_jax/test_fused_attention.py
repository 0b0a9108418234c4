"""Fused attention in every context-parallel mode, checked numerically on the CPU.

The blockwise "chunked" kernel (the planner's stand-in for splash and cuDNN) against the XLA
reference, its memory against the sequence length, and the ring's exact combination of
per-block outputs and log-sum-exps with each step kernel that runs here: the XLA reference,
"chunked", and the TPU splash kernels in Pallas interpret mode (the same kernels the TPU runs).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mugv_jax.parallel import attention, blockwise, sharding
from mugv_jax.parallel import context_parallel as cp
from tests.trainer_helpers import make_mesh

# float32 on the CPU: the kernels only reorder the softmax sums (online softmax over key blocks).
RTOL = 1e-5
HIGHEST = jax.lax.Precision.HIGHEST


def _qkv(b=2, nq=37, nk=300, h=3, d=72, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(ks[0], (b, nq, h, d)),
        jax.random.normal(ks[1], (b, nk, h, d)),
        jax.random.normal(ks[2], (b, nk, h, d)),
    )


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _value_and_grads(fn, q, k, v):
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_chunked_matches_the_reference_forward_and_gradients():
    q, k, v = _qkv()
    # Sample 0: a ragged caption mask over 3 key blocks of 128; sample 1: no valid key at all.
    mask = jnp.stack([jnp.arange(300) % 3 != 1, jnp.zeros(300, bool)])
    ref = lambda q, k, v: attention._xla_attention(q, k, v, mask, HIGHEST)
    out_ref, g_ref = _value_and_grads(ref, q, k, v)
    out, g = _value_and_grads(lambda q, k, v: blockwise.attention(q, k, v, mask, HIGHEST, 128), q, k, v)
    assert bool(jnp.all(out[1] == 0)) and _rel(out, out_ref) <= RTOL
    for a, b in zip(g, g_ref):
        assert _rel(a, b) <= RTOL
    # Several query blocks as well (the backward accumulates dk/dv over them).
    blocks = dict(precision=HIGHEST, block=64, q_block=16)
    out, lse = jax.jit(functools.partial(blockwise.forward, **blocks))(q, k, v, mask)
    dout = jnp.cos(out)  # the cotangent of sum(sin(out))
    grads = jax.jit(functools.partial(blockwise.backward, **blocks))(q, k, v, mask, out, lse, dout)
    assert _rel(out, out_ref) <= RTOL
    for a, b in zip(grads, g_ref):
        assert _rel(a, b) <= RTOL
    # Through the backend table, without a mask (one block).
    out = attention.dot_product_attention(q, k, v, implementation="chunked", precision=HIGHEST)
    assert _rel(out, attention.dot_product_attention(q, k, v, precision=HIGHEST)) <= RTOL


def _temp_bytes(fn, n):
    q = jax.ShapeDtypeStruct((1, n, 4, 72), jnp.float32)
    mask = jnp.ones((1, n), bool)
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def test_chunked_temporaries_grow_linearly_with_the_sequence():
    """Forward + backward temporaries at N and 2N: the chunked kernel's double (O(N·d) residuals,
    one [H, N, 512] score block), the reference's quadruple (the N² scores)."""
    chunked = lambda q, k, v, m: blockwise.attention(q, k, v, m, None)
    xla = lambda q, k, v, m: attention._xla_attention(q, k, v, m, None)
    n = 2048
    c1, c2 = _temp_bytes(chunked, n), _temp_bytes(chunked, 2 * n)
    x1, x2 = _temp_bytes(xla, n), _temp_bytes(xla, 2 * n)
    mib = lambda a, b: f"{a / 2**20:.1f}/{b / 2**20:.1f} MiB"
    print(f"temporaries N={n}/{2 * n}: chunked {mib(c1, c2)}, xla {mib(x1, x2)}")
    assert c2 / c1 < 2.2, (c1, c2)
    assert x2 / x1 > 3.5, (x1, x2)
    assert c2 < x2 / 4


# "chunked" steps are the "xla" program at these block sizes (8 keys per shard, one block).
RING_STEPS = ["xla", "splash"]


@pytest.mark.parametrize("implementation", RING_STEPS)
def test_ring_combines_fused_blocks_exactly(implementation):
    """Self-attention over 4 context shards with a padded tail (30 of 32 tokens valid): the ring
    of per-block kernels with log-sum-exp equals one device's attention, gradients included."""
    q, k, v = _qkv(b=2, nq=32, nk=32, h=2, d=72, seed=1)
    mask = jnp.broadcast_to(jnp.arange(32) < 30, (2, 32))
    ref = lambda q, k, v: cp.self_attention(q, k, v, key_mask=mask, precision=HIGHEST)
    out_ref, g_ref = _value_and_grads(ref, q, k, v)
    mesh = make_mesh((1, 1, 1, 4))
    fn = lambda q, k, v: cp.self_attention(
        q, k, v, key_mask=mask, mode="ring", implementation=implementation, precision=HIGHEST
    )
    with sharding.activation_sharding(mesh), attention.stand_in("chunked", interpret_splash=True):
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
        out, g = jax.jit(lambda q, k, v: _value_and_grads(fn, q, k, v))(q, k, v)
    assert "ppermute" in jaxpr and ("pallas_call" in jaxpr) == (implementation == "splash")
    assert not np.any(np.asarray(out[:, 30:]))  # padded query rows are zero
    assert _rel(out, out_ref) <= RTOL
    for a, b in zip(g, g_ref):
        assert _rel(a, b) <= RTOL, implementation
