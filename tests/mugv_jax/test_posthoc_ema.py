"""Post-hoc EMA: weights, combination and the decay sweep."""

import numpy as np
import pytest

from mugv_jax.recipe import posthoc_ema as pe


def test_weights_by_hand():
    # steps 10, 20, 40; decay 0.5 per step -> 0.5^30, 0.5^20, 1, normalised.
    raw = np.array([0.5**30, 0.5**20, 1.0])
    np.testing.assert_allclose(pe.ema_weights([10, 20, 40], 0.5), raw / raw.sum(), rtol=1e-12)
    # decay 0.9 over steps 0, 1, 2: 0.81, 0.9, 1 / 2.71
    np.testing.assert_allclose(pe.ema_weights([0, 1, 2], 0.9), np.array([0.81, 0.9, 1.0]) / 2.71, rtol=1e-12)
    np.testing.assert_array_equal(pe.ema_weights([1, 2, 3], 0.0), [0, 0, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        pe.ema_weights([2, 1], 0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pe.ema_weights([1, 2], 1.0)


def test_combine_small_arrays_by_hand():
    ckpts = [
        {"a": np.array([1.0, 2.0]), "b": {"c": np.array(3.0)}},
        {"a": np.array([3.0, 6.0]), "b": {"c": np.array(5.0)}},
    ]
    out = pe.combine(iter(ckpts), [0, 1], [0.5, 0.0])
    # decay 0.5: weights 1/3, 2/3.
    np.testing.assert_allclose(out[0]["a"], [1 / 3 + 2, 2 / 3 + 4], rtol=1e-6)
    np.testing.assert_allclose(out[0]["b"]["c"], 3 / 3 + 10 / 3, rtol=1e-6)
    np.testing.assert_array_equal(out[1]["a"], [3.0, 6.0])  # decay 0 = the last checkpoint
    assert out[0]["a"].dtype == np.float32


def test_sweep_picks_the_decay_minimising_validation_loss():
    # Checkpoints oscillate around an optimum at 0: noisy SGD iterates. Averaging more (larger
    # decay) helps until the early, far-off checkpoints get weight.
    rng = np.random.default_rng(0)
    steps = list(range(0, 200, 10))
    ckpts = [{"w": np.array([5.0 * np.exp(-s / 20.0)]) + rng.normal(0, 1.0, 1)} for s in steps]
    decays = [0.0, 0.9, 0.95, 0.99, 0.999]
    avgs = pe.combine(iter(ckpts), steps, decays)
    val = lambda p: float(np.sum(np.square(p["w"])))
    best, params, losses = pe.sweep(avgs, decays, val)
    assert losses[best] == min(losses.values())
    assert best == min(losses, key=losses.get) and best not in (0.0,)
    np.testing.assert_array_equal(params["w"], avgs[decays.index(best)]["w"])


def test_cli_sweeps_a_real_run_and_writes_the_best_average(tmp_path):
    import json
    import os

    import jax

    from mugv.io.weights import load_params as jax_params
    from tests.mugv_jax.test_curriculum import STAGE1_STEPS, stage1_run

    root, _, _ = stage1_run()
    run = os.path.join(root, "stage1_image_video")
    dst = str(tmp_path / "avg")
    assert pe.main(["--run", run, "--decays", "0.0,0.5,0.9", "--dst", dst]) == 0
    info = json.load(open(os.path.join(dst, "posthoc_ema.json")))
    half = STAGE1_STEPS // 2
    assert info["steps"] == [half, STAGE1_STEPS]
    losses = {float(k): v for k, v in info["losses"].items()}
    assert info["best_decay"] == min(losses, key=losses.get)
    assert len(set(losses.values())) == 3  # the decays really give different models
    # The written weights are the hand-computed average of the two checkpoints.
    _, got = jax_params(f"jax:{dst}")
    _, a = jax_params(f"jax:{run}/checkpoints@{half}")
    _, b = jax_params(f"jax:{run}/checkpoints@{STAGE1_STEPS}")
    d = info["best_decay"]
    wa = d**half / (d**half + 1.0)
    for g, x, y in zip(jax.tree.leaves(got), jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(g, wa * x + (1 - wa) * y, rtol=1e-5, atol=1e-7)
