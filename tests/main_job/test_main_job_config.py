"""The main job's cheap parts: stage bookkeeping (reuse, redo, Ctrl-C), the pixel measure the
learning check reports, and the configs. The end-to-end run is tests/main_job/test_main_job.py."""

import json
import os

import numpy as np
import pytest

from configs import main as main_config
from main_job import measure
from main_job.run import ORDER
from main_job.stages import MARKER, Stages
from mugv.data import procedural


def _finish_all(workdir):
    s = Stages(workdir, ORDER)
    for name in ORDER:
        assert s.done(name) is None
        d = s.start(name, keep_partial=True)
        open(os.path.join(d, "output"), "w").write(name)
        s.finish(name, {"name": name})
    return s


def test_finished_stages_are_reused_and_redo_repeats_that_stage_and_every_later_one(tmp_path):
    _finish_all(str(tmp_path))
    again = Stages(str(tmp_path), ORDER)
    assert [again.done(n) for n in ORDER] == [{"name": n} for n in ORDER]
    redo = Stages(str(tmp_path), ORDER, redo=["dit"])
    assert [n for n in ORDER if redo.done(n) is None] == ["dit", "sample"]
    # A redo starts from an empty directory even for stages that otherwise keep partial work.
    d = redo.start("dit", keep_partial=True)
    assert os.listdir(d) == []
    assert os.path.exists(os.path.join(str(tmp_path), "vae", "output"))


def test_interrupted_stage_is_not_done_and_keeps_or_drops_partial_work_as_asked(tmp_path):
    s = Stages(str(tmp_path), ORDER)
    d = s.start("dit", keep_partial=True)
    open(os.path.join(d, "checkpoint"), "w").write("step 100")
    # (Ctrl-C here: no marker was written.)
    s2 = Stages(str(tmp_path), ORDER)
    assert s2.done("dit") is None
    assert os.listdir(s2.start("dit", keep_partial=True)) == ["checkpoint"]  # the trainer resumes
    d = s2.start("encode", keep_partial=False)
    open(os.path.join(d, "half_written"), "w").write("x")
    assert os.listdir(Stages(str(tmp_path), ORDER).start("encode", keep_partial=False)) == []
    s2.finish("dit", {"steps": 3})
    assert json.load(open(os.path.join(str(tmp_path), "dit", MARKER))) == {"steps": 3}


def test_unknown_redo_stage_is_named():
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['vea'\].*data,vae,encode,dit,sample"):
        Stages("/nonexistent", ORDER, redo=["vea"])


def test_pixel_measure_reads_colour_and_direction_of_every_procedural_clip():
    clips = list(procedural.generate(48, seed=3))
    got = [measure.pixel_measure(c.frames) for c in clips]
    assert [g["colour"] for g in got] == [c.colour for c in clips]
    assert [g["direction"] for g in got] == [c.direction for c in clips]


def test_nearest_group_uses_the_closest_clips_of_each_group():
    rng = np.random.default_rng(0)
    by_group = {("red", "left"): rng.normal(size=(5, 2, 3)), ("blue", "up"): rng.normal(size=(5, 2, 3)) + 3.0}
    z = by_group[("blue", "up")][2] + 0.01
    group, dists = measure.nearest_group(z, by_group)
    assert group == ("blue", "up") and dists[("blue", "up")] < dists[("red", "left")]


def test_main_configs_load_and_quick_is_shorter():
    full, quick = main_config.get_config(None), main_config.get_config("quick")
    assert quick.dit.num_steps < full.dit.num_steps and quick.vae.num_steps < full.vae.num_steps
    assert quick.dit.data.source == "shards" and quick.dit.objective.i2v_prob > 0
    with pytest.raises(ValueError, match="configs/main.py: unknown argument 'fast'"):
        main_config.get_config("fast")


def test_vae_grouping_reaches_the_trained_vae_config():
    from main_job.run import _vae_train_config
    from mugv_jax.vae.training import resolve_vae_config

    full, quick = main_config.get_config(None), main_config.get_config("quick")
    got = resolve_vae_config(_vae_train_config(full))
    assert (got.norm_num_groups, got.temporal_num_groups) == (1, 1)
    assert got.block_out_channels == (8, 16, 32, 32) and got.micro_frame_size == 8  # tiny's widths
    q = resolve_vae_config(_vae_train_config(quick))
    assert (q.norm_num_groups, q.temporal_num_groups) == (4, 4)
