"""The rectified-flow objective (docs/reference.md §2), piece by piece against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from mugv import rng as ref_rng
from mugv.training import ObjectiveConfig, shift_ratio
from mugv_jax.train import objective as obj
from mugv_jax.train import rng


def test_shift_ratio_and_shifted_t_by_hand():
    # 720p (latent 160×90 → 1280×720 px), 14 frames: r = sqrt(1280·720/512²)·sqrt(14).
    r = shift_ratio((14, 160, 90))
    assert r == pytest.approx(np.sqrt(1280 * 720 / 512**2) * np.sqrt(14))
    # The reference loader's hard-coded F = 10 is a config value.
    assert shift_ratio((14, 160, 90), shift_num_frames=10) == pytest.approx(np.sqrt(1280 * 720 / 512**2) * np.sqrt(10))
    # τ = 0.5, r = 3 → τ' = 1.5 / 2 = 0.75.
    np.testing.assert_allclose(obj.shift_t(jnp.array([0.0, 500.0, 1000.0]), 3.0), [0.0, 750.0, 1000.0], rtol=1e-6)


def test_logit_normal_timesteps():
    t = np.asarray(obj.logit_normal_t(rng.normals(rng.key(0, 0), ref_rng.TAG_T, 20000)))
    assert t.min() > 0 and t.max() < 1000
    # sigmoid(N(0,1)): median 500; P(t < sigmoid(1)·1000) = Φ(1) ≈ 0.8413.
    assert abs(np.median(t) - 500) < 10
    assert abs(np.mean(t < 1000 / (1 + np.exp(-1.0))) - 0.8413) < 0.01


def test_noisy_latents_and_velocity_target_by_hand():
    x0 = jnp.full((2, 1, 1, 1, 1), 2.0)
    eps = jnp.full((2, 1, 1, 1, 1), -1.0)
    xt = obj.noisy_latents(x0, eps, jnp.array([250.0, 1000.0]))
    # 0.75·2 + 0.25·(−1) = 1.25; at t=1000 pure noise.
    np.testing.assert_allclose(np.asarray(xt).ravel(), [1.25, -1.0])


def test_masked_frame_mse_by_hand():
    pred = jnp.zeros((2, 1, 3, 1, 1))
    target = jnp.array([1.0, 2.0, 3.0, 1.0, 1.0, 1.0]).reshape(2, 1, 3, 1, 1)
    x_mask = jnp.array([[False, True, True], [True, True, True]])
    loss, per_sample = obj.masked_frame_mse(pred, target, x_mask)
    # sample 0: frames 1, 2 count → (4 + 9)/2 = 6.5; sample 1: 1.0; batch mean 3.75.
    np.testing.assert_allclose(per_sample, [6.5, 1.0])
    assert float(loss) == pytest.approx(3.75)


def _x_mask(batch, frames, config):
    b = {
        "latents": jnp.zeros((batch, 1, frames, 1, 1)),
        "y": jnp.zeros((batch, 1, 2, 3)),
        "mask": jnp.ones((batch, 2), jnp.int32),
        "fps": jnp.full((batch,), 24.0),
    }
    inputs, _, _ = obj.prepare(rng.key(1, 0), b, jnp.zeros((2, 3)), config)
    return np.asarray(inputs["x_mask"])


def test_conditioning_frames_are_a_prefix_with_the_configured_probability():
    first = _x_mask(4000, 8, ObjectiveConfig(i2v_prob=0.3))
    n_cond = (~first).sum(1)
    assert set(np.unique(n_cond)) == {0, 1}
    assert abs(np.mean(n_cond == 1) - 0.3) < 0.03
    quarter = _x_mask(4000, 8, ObjectiveConfig(i2v_prob=1.0, i2v_mode="quarter"))
    n_cond = (~quarter).sum(1)
    assert set(np.unique(n_cond)) == {1, 2}  # 1..T//4 with T = 8
    # conditioning frames are exactly the first k frames
    for row, k in zip(quarter[:50], n_cond[:50]):
        assert not row[:k].any() and row[k:].all()
    # a single frame (image) can never be all-conditioning
    assert _x_mask(16, 1, ObjectiveConfig(i2v_prob=1.0)).all()


def test_whole_caption_dropout_to_null_features():
    y = jnp.ones((3, 1, 4, 2))
    mask = jnp.array([[1, 1, 0, 0]] * 3)
    null = jnp.arange(12.0).reshape(6, 2)
    y_some, m_some = obj.drop_captions(y, mask, null, jnp.array([True, False, True]))
    for i in (0, 2):
        np.testing.assert_array_equal(y_some[i, 0], np.asarray(null[:4]))
        np.testing.assert_array_equal(m_some[i], np.ones(4))
    np.testing.assert_array_equal(y_some[1], y[1])
    np.testing.assert_array_equal(m_some[1], mask[1])
    # The drop rate is the configured probability.
    b = {
        "latents": jnp.zeros((4000, 1, 1, 1, 1)),
        "y": jnp.zeros((4000, 1, 2, 3)),
        "mask": jnp.zeros((4000, 2), jnp.int32),
        "fps": jnp.full((4000,), 24.0),
    }
    inputs, _, _ = obj.prepare(rng.key(2, 5), b, jnp.ones((2, 3)), ObjectiveConfig(caption_dropout_prob=0.25))
    assert abs(float(np.mean(np.asarray(inputs["mask"])[:, 0])) - 0.25) < 0.03


def test_prepare_keeps_conditioning_frames_clean():
    b = {
        "latents": jnp.ones((4, 2, 4, 2, 2)) * 3.0,
        "y": jnp.zeros((4, 1, 3, 5)),
        "mask": jnp.ones((4, 3), jnp.int32),
        "fps": jnp.full((4,), 24.0),
    }
    inputs, target, t = obj.prepare(
        rng.key(0, 0), b, jnp.zeros((8, 5)), ObjectiveConfig(i2v_prob=1.0, caption_dropout_prob=0.0)
    )
    x = np.asarray(inputs["x"])
    assert not np.asarray(inputs["x_mask"])[:, 0].any()
    np.testing.assert_array_equal(x[:, :, 0], 3.0)  # frame 0 = x0
    assert np.abs(x[:, :, 1:] - 3.0).max() > 0.1  # the rest is noised
    assert target.shape == b["latents"].shape and t.shape == (4,)


def test_objective_config_validation():
    with pytest.raises(ValueError, match="i2v_mode"):
        ObjectiveConfig(i2v_mode="last")
    with pytest.raises(ValueError, match="caption_dropout_prob"):
        ObjectiveConfig(caption_dropout_prob=1.5)


def test_fixed_shift_ratio_overrides_the_resolution_rule():
    b = {
        "latents": jnp.zeros((4096, 1, 1, 2, 2)),
        "y": jnp.zeros((4096, 1, 2, 3)),
        "mask": jnp.ones((4096, 2), jnp.int32),
        "fps": jnp.full((4096,), 24.0),
    }
    key = rng.key(0, 0)
    _, _, t_rule = obj.prepare(key, b, jnp.zeros((2, 3)), ObjectiveConfig())
    _, _, t_fixed = obj.prepare(key, b, jnp.zeros((2, 3)), ObjectiveConfig(shift_ratio=1.0))
    raw = obj.logit_normal_t(rng.normals(key, ref_rng.TAG_T, 4096))
    np.testing.assert_allclose(t_fixed, raw, rtol=1e-6)  # r = 1: no shift
    # 16×16 px, 1 frame: r = 1/32 pulls every t towards 0.
    np.testing.assert_allclose(t_rule, obj.shift_t(raw, 1 / 32), rtol=1e-5)
    assert float(jnp.median(t_rule)) < 50
