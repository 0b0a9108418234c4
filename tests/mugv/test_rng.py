"""mugv.rng: one definition of a step's random numbers, evaluated identically by every backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from mugv import rng as ref
from mugv.training import ObjectiveConfig
from mugv_jax.train import objective as jobj
from mugv_jax.train import rng as jrng

# Box–Muller's log/cos are the only non-integer steps: numpy and XLA differ in their last bits.
NORMAL_ABS = 1e-6


def test_threefry_is_jax_threefry_2x32():
    # The reference is the published Threefry-2x32-20, checked against JAX's implementation.
    c0 = (np.arange(64, dtype=np.uint64) * 2654435761 % 2**32).astype(np.uint32)
    c1 = np.arange(64, dtype=np.uint32) + np.uint32(2**31 + 7)
    for k0, k1 in ((0, 0), (5, 2**32 - 3), (123456789, 42)):
        x0, x1 = ref.threefry2x32(k0, k1, c0, c1)
        got = np.asarray(threefry_2x32(jnp.array([k0, k1], jnp.uint32), jnp.concatenate([c0, c1])))
        np.testing.assert_array_equal(np.concatenate([x0, x1]), got)
        j0, j1 = jax.jit(jrng.threefry2x32)(jnp.array([k0, k1], jnp.uint32), jnp.asarray(c0), jnp.asarray(c1))
        np.testing.assert_array_equal(np.asarray(j0), x0)
        np.testing.assert_array_equal(np.asarray(j1), x1)


def test_jax_draws_equal_the_reference():
    cfg = ObjectiveConfig(i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.3)
    shape = (6, 3, 8, 4, 6)  # non-square, multi-frame
    d = jax.jit(lambda k: jobj.draws(k, shape, cfg))(jrng.key(11, 37))
    r = ref.pretrain_draws(11, 37, np.arange(6), shape[1:], i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.3)
    np.testing.assert_array_equal(np.asarray(d["n_cond"]), r["n_cond"])
    np.testing.assert_array_equal(np.asarray(d["drop"]), r["drop"])
    np.testing.assert_allclose(np.asarray(d["u"]), r["u"], atol=NORMAL_ABS, rtol=0)
    np.testing.assert_allclose(np.asarray(d["eps"]), r["eps"], atol=NORMAL_ABS, rtol=0)
    # Different steps, seeds and tags give different numbers.
    assert not np.allclose(ref.normals(11, 38, ref.TAG_NOISE, [0], (8,)), r["eps"][0].ravel()[:8])
    assert not np.allclose(ref.normals(12, 37, ref.TAG_NOISE, [0], (8,)), r["eps"][0].ravel()[:8])


def test_a_samples_draws_do_not_depend_on_who_draws_them():
    # A data-parallel rank drawing rows 4..7 gets exactly rows 4..7 of the global draw.
    full = ref.pretrain_draws(
        3, 9, np.arange(8), (2, 3, 4, 4), i2v_prob=0.5, i2v_mode="first", caption_dropout_prob=0.5
    )
    part = ref.pretrain_draws(
        3, 9, np.arange(4, 8), (2, 3, 4, 4), i2v_prob=0.5, i2v_mode="first", caption_dropout_prob=0.5
    )
    for k in full:
        np.testing.assert_array_equal(full[k][4:], part[k])


def test_distributions():
    z = ref.normals(0, 1, ref.TAG_NOISE, np.arange(200), (500,))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # P(|z| < 1) of a standard normal.
    assert abs(np.mean(np.abs(z) < 1) - 0.6827) < 0.005
    u = ref.uniforms(0, 1, ref.TAG_CAPTION_DROP, np.arange(100_000))
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    k = ref.randints(0, 1, ref.TAG_I2V_FRAMES, np.arange(30_000), 3)
    assert set(np.unique(k)) == {0, 1, 2}
    np.testing.assert_allclose(np.bincount(k) / len(k), [1 / 3] * 3, atol=0.01)


def test_limits_are_checked():
    with pytest.raises(ValueError, match="outside the 16777216 rows"):
        ref.bits(0, 0, 1, [ref.MAX_ROWS], 1)
    with pytest.raises(ValueError, match="randint range"):
        ref.randint(np.zeros(1, np.uint32), 0)


def test_null_text_is_the_same_everywhere():
    a = ref.null_text(4, 12, 16)
    assert a.shape == (12, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, ref.null_text(4, 12, 16))
    assert abs(a.std() * 4 - 1) < 0.15  # N(0, 1/dim)
    assert not np.allclose(a, ref.null_text(5, 12, 16))


def test_megatron_draws_equal_the_reference():
    import torch

    from mugv_megatron.train import objective as mobj

    cfg = ObjectiveConfig(i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.3)
    d = mobj.draw_samples(11, 37, range(2, 6), (3, 8, 4, 6), cfg)
    r = ref.pretrain_draws(
        11, 37, np.arange(2, 6), (3, 8, 4, 6), i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.3
    )
    np.testing.assert_array_equal(d.n_cond.numpy(), r["n_cond"])
    np.testing.assert_array_equal(d.drop.numpy(), r["drop"])
    np.testing.assert_allclose(d.u.numpy(), r["u"], atol=NORMAL_ABS, rtol=0)
    np.testing.assert_allclose(d.eps.numpy(), r["eps"], atol=NORMAL_ABS, rtol=0)
    assert d.eps.dtype == torch.float32
