"""Curriculum stages as configs: image:video annealing, stage-to-stage hand-over of weights."""

import functools
import os
import tempfile

import jax
import numpy as np
import pytest

from configs import mugv_10b, tiny_curriculum
from mugv.run import data as run_data
from mugv.run.config import model_config_from
from mugv_jax.train import backend as train_lib

STAGE1_STEPS = 8


@functools.cache
def stage1_run():
    """Stage 1 of the tiny curriculum, a few steps (shared with tests/mugv_jax/test_validation.py).
    Image mixing is off here (one compiled step); test_image_fraction_* covers the mixing."""
    root = tempfile.mkdtemp(prefix="mugv-curriculum-")
    c = tiny_curriculum.get_config(f"stage1_image_video@{root}")
    c.init_from = ""  # the expanded small model is tests/mugv_jax/test_expand.py's business
    c.num_steps = STAGE1_STEPS
    c.validation.every = STAGE1_STEPS // 2
    c.checkpoint_every = STAGE1_STEPS // 2  # two checkpoints: tests/mugv_jax/test_posthoc_ema.py averages them
    c.keep_checkpoints = 4
    c.data.mix.image_fraction_start = c.data.mix.image_fraction_end = 0.0
    c.async_checkpoint = False
    c.log_every = 1
    summary = train_lib.train(c, os.path.join(root, "stage1_image_video"))
    return root, c, summary


def _max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_stage2_starts_from_stage1_ema_with_fresh_optimizer_and_new_buckets():
    root, c1, s1 = stage1_run()
    c2 = tiny_curriculum.get_config(f"stage2_clip_2s@{root}")
    assert c2.init_from == f"jax:{root}/stage1_image_video/checkpoints" and c2.init_weights == "ema"
    assert tuple(map(tuple, c2.data.buckets)) != tuple(map(tuple, c1.data.buckets))
    assert c2.objective.i2v_prob > 0 and c1.objective.i2v_prob == 0  # first-frame masking from stage 2
    c2.num_steps = 0
    c2.async_checkpoint = False
    c2.validation.every = 0
    s2 = train_lib.train(c2, os.path.join(root, "stage2_clip_2s"))
    ema1 = jax.device_get(s1["state"]["ema"])
    # Documented hand-over: stage 2's params (and its EMA) are exactly stage 1's final EMA...
    assert _max_diff(s2["state"]["params"], ema1) == 0.0
    assert _max_diff(s2["state"]["ema"], ema1) == 0.0
    # ...which is not stage 1's raw params (the choice matters).
    assert _max_diff(s1["state"]["params"], ema1) > 1e-6
    # Fresh optimizer and counters.
    assert int(s2["state"]["step"]) == 0
    assert all(float(np.max(np.abs(x))) == 0.0 for x in jax.tree.leaves(s2["state"]["opt_state"]) if np.ndim(x) > 0)
    # Its data iterator yields its own buckets.
    it = run_data.build_iterator(c2, model_config_from(c2))
    shapes = {next(it)["latents"].shape for _ in range(4)}
    assert shapes == {(b[3], 24, b[0], b[1], b[2]) for b in c2.data.buckets}


def test_image_fraction_is_annealed_toward_video():
    c = tiny_curriculum.get_config("stage1_image_video")
    start, end = c.data.mix.image_fraction_start, c.data.mix.image_fraction_end
    assert start > end
    assert run_data.image_fraction(0, start, end, 100) == pytest.approx(start)
    assert run_data.image_fraction(50, start, end, 100) == pytest.approx((start + end) / 2)
    assert run_data.image_fraction(500, start, end, 100) == pytest.approx(end)
    it = run_data.build_iterator(c, model_config_from(c))
    n = c.data.mix.anneal_steps
    frames = [next(it)["latents"].shape[2] for _ in range(n)]
    early = np.mean([f == 1 for f in frames[: n // 4]])
    late = np.mean([f == 1 for f in frames[-n // 4 :]])
    assert early > late + 0.15, (early, late)
    # The mixed iterator resumes where it was.
    state = it.get_state()
    a = next(it)
    it2 = run_data.build_iterator(c, model_config_from(c))
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["latents"], a["latents"])


@pytest.mark.parametrize("make", [tiny_curriculum.get_config, mugv_10b.get_config])
def test_every_stage_initialises_from_the_previous_one(make):
    mod = tiny_curriculum if make is tiny_curriculum.get_config else mugv_10b
    names = list(mod.STAGES)
    for prev, stage in zip(names, names[1:]):
        c = make(f"{stage}@/r")
        if c.mode == "pretrain" and mod.STAGES[stage][0] == prev:
            assert c.init_from == f"jax:/r/{prev}/checkpoints" and c.init_weights == "ema", stage
    with pytest.raises(ValueError, match="unknown stage"):
        make("nope")
