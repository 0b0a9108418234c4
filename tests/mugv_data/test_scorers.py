"""Pluggable scorers and captioners: registries, the aesthetic filter (≥ 4.5) with its recorded
reason, a captioner, a RAFT-style flow plug-in, captions + aesthetic scores from a CSV manifest
and the release's aesthetic-score suffix. The stand-ins are built here (no models ship offline)."""

import numpy as np
import pytest

from mugv_data import clips, scorers
from mugv_data import prepare as pipeline
from mugv_data.clips import FilterConfig
from mugv_data.encode import PixelBucket
from tests.mugv_data.test_clips import SIZE, _write_mp4, textured_scene


class BrightnessAesthetic:
    """Stand-in 'aesthetic' model: mean luma / 25, so bright scenes score above 4.5."""

    name = "brightness"

    def __init__(self):
        self.calls = 0

    def __call__(self, frames):
        self.calls += 1
        return float(clips.luma(frames).mean() / 25.0)


class ColourCaptioner:
    name = "colour"

    def __call__(self, frames, fps):
        c = ("red", "green", "blue")[int(np.argmax(frames.reshape(-1, 3).mean(0)))]
        return f"a {c} texture scrolling at {fps:g} fps"


@pytest.fixture
def registered(monkeypatch):
    aes = BrightnessAesthetic()
    monkeypatch.setitem(scorers.AESTHETIC_SCORERS, "test_brightness", lambda: aes)
    monkeypatch.setitem(scorers.CAPTIONERS, "test_colour", ColourCaptioner)
    # A RAFT-like plug-in: any dense flow function; this one says everything moves 25 px.
    monkeypatch.setitem(
        scorers.MOTION_SCORERS,
        "test_raft",
        lambda: scorers.FlowMotionScorer(lambda a, b: np.full((*a.shape[:2], 2), 25 / 2**0.5), "test_raft"),
    )
    return aes


def test_aesthetic_filter_and_captioner_record_their_decisions(registered):
    bright = textured_scene(2, 16)  # palette (180, 70, 70) ± 40: mean luma ≈ 103 → 4.1
    brighter = np.clip(textured_scene(3, 16).astype(int) + 60, 0, 255).astype(np.uint8)  # (130, 240, 130): 7.8
    black = np.full((16, SIZE, SIZE, 3), 3, np.uint8)
    frames = np.concatenate([brighter, bright, black])
    cfg = FilterConfig(min_seconds=1.0, aesthetic="test_brightness", captioner="test_colour")
    out = list(clips.split_and_filter("v.mp4", frames, 8.0, cfg))
    recs = [r for _, r in out]
    assert [(r["kept"], r["reason"]) for r in recs] == [(True, None), (False, "low_aesthetic"), (False, "black")]
    assert recs[0]["metrics"]["aesthetic"] >= 4.5 > recs[1]["metrics"]["aesthetic"]
    # The costly scorer runs only on clips that passed every cheaper filter.
    assert "aesthetic" not in recs[2]["metrics"] and registered.calls == 2
    assert recs[0]["caption"] == "a green texture scrolling at 8 fps" and recs[0]["caption_source"] == "colour"
    assert out[0][0].caption == recs[0]["caption"] and "caption" not in recs[1]
    # Lower threshold: both textured clips pass.
    lax = [
        r["kept"]
        for _, r in clips.split_and_filter(
            "v.mp4", frames, 8.0, FilterConfig(min_seconds=1.0, aesthetic="test_brightness", aesthetic_min=3.0)
        )
    ]
    assert lax == [True, True, False]


def test_motion_scorer_registry_and_plugins(registered):
    frames = textured_scene(1, 16)
    recs = [
        r for _, r in clips.split_and_filter("v.mp4", frames, 8.0, FilterConfig(min_seconds=1.0, motion="test_raft"))
    ]
    assert recs[0]["reason"] == "too_dynamic" and recs[0]["metrics"]["motion"] == pytest.approx(25.0)
    assert recs[0]["motion_scorer"] == "test_raft"
    old = scorers.build("motion", "frame_difference")(frames)
    assert old == pytest.approx(clips.motion_score(frames)) and old > 1
    with pytest.raises(ValueError, match="unknown motion scorer 'raft'.*farneback"):
        scorers.build("motion", "raft")
    bad = scorers.FlowMotionScorer(lambda a, b: np.zeros((4, 4, 2)), "badflow")
    with pytest.raises(ValueError, match="badflow.*64, 64, 2"):
        bad(frames)


def test_manifest_captions_and_aesthetic_suffix(tmp_path):
    video = tmp_path / "clip.mp4"
    _write_mp4(str(video), np.concatenate([textured_scene(5, 16), textured_scene(6, 16)]), 8)
    (tmp_path / "caps.csv").write_text(
        "clip_id,video,caption,aesthetic\nclip.mp4#0001,,a second shot,5.25\n,clip.mp4,a video-level caption,4.75\n"
    )
    spec = pipeline.PrepareSpec(
        source="files",
        buckets=[PixelBucket(16, 32, 32)],
        paths=[str(video)],
        filters=FilterConfig(min_seconds=1.0),
        captions=str(tmp_path / "caps.csv"),
        text_encoder="hashing",
        text_len=8,
        aes_suffix="score",
    )
    records, examples = pipeline.ItemWorker(spec)(0)
    assert [k for k, _ in examples] == [0, 1] and [k for k, _ in records] == [0, 1]
    assert [ex["caption"] for _, ex in examples] == [
        "a video-level caption aesthetic score: 4.8.",
        "a second shot aesthetic score: 5.2.",
    ]
    assert [r["caption_source"] for _, r in records] == ["manifest", "manifest"]
    assert examples[0][1]["latents"].shape == (24, 2, 4, 4)
    fixed = pipeline.PrepareSpec(**{**spec.__dict__, "captions": None, "aes_suffix": 6.0, "uncaptioned": "empty"})
    _, ex2 = pipeline.ItemWorker(fixed)(0)
    # No caption anywhere for an unknown file, kept by choice (issue 25: the default refuses):
    # the suffix alone, as the release formats it.
    assert [ex["caption"] for _, ex in ex2] == [" aesthetic score: 6.0."] * 2
    no_score = pipeline.PrepareSpec(**{**spec.__dict__, "captions": None, "uncaptioned": "empty"})
    with pytest.raises(ValueError, match=r"clip.mp4#0000.*aesthetic"):
        pipeline.ItemWorker(no_score)(0)
    (tmp_path / "bad.jsonl").write_text('{"video": "x.mp4"}\n')
    with pytest.raises(ValueError, match="bad.jsonl row 1"):
        scorers.ManifestCaptions(str(tmp_path / "bad.jsonl"))


def test_clips_without_a_caption_are_refused_or_skipped_loudly(tmp_path, capsys):
    """Issue 25: a clip with no caption became an empty caption silently. The default refuses,
    before any video is decoded when a whole video has none; --uncaptioned=skip leaves such clips
    out with reason no_caption and one WARNING line with the count."""
    from absl import flags

    from mugv.data import shards
    from mugv_data.__main__ import main

    flags.FLAGS.mark_as_parsed()
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, seed in (("captioned.mp4", 5), ("silent.mp4", 7)):
        _write_mp4(str(videos / name), np.concatenate([textured_scene(seed, 16), textured_scene(seed + 1, 16)]), 8)
    # Only the first shot of captioned.mp4 has a row.
    (tmp_path / "caps.csv").write_text("clip_id,caption\ncaptioned.mp4#0000,a first shot\n")
    common = [f"--videos={videos}", "--vae=patch-mean", "--text-encoder=hashing", "--text-len=8"]
    common += ["--buckets=16x32x32", f"--captions={tmp_path / 'caps.csv'}", "--min-seconds=1"]
    out = tmp_path / "out"
    with pytest.raises(
        SystemExit, match=r"error: 1 of 2 videos have no caption for any clip \(.*silent.mp4\).*--captions"
    ):
        main(["prepare", f"--out={out}", *common])
    assert not out.exists()  # refused before any work

    main(["prepare", f"--out={out}", *common, "--uncaptioned=skip"])
    err = capsys.readouterr().err
    assert f"WARNING: 3 clips without a caption left out (--uncaptioned=skip); see {out}/manifest.jsonl" in err
    index = shards.read_index(shards.dataset_dir(str(out)))
    assert index["sample_ids"] == ["captioned.mp4#0000"]
    # A clip the file does not cover, in a video it does, is refused by name when it is reached.
    spec = pipeline.PrepareSpec(
        source="files",
        buckets=[PixelBucket(16, 32, 32)],
        paths=[str(videos / "captioned.mp4")],
        filters=FilterConfig(min_seconds=1.0),
        captions=str(tmp_path / "caps.csv"),
        text_encoder="hashing",
        text_len=8,
    )
    pipeline.check_captions(spec)
    with pytest.raises(ValueError, match=r"clip captioned.mp4#0001 has no caption; give captions"):
        pipeline.ItemWorker(spec)(0)
