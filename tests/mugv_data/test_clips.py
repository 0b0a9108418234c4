"""mugv_data.clips: shots in the manifest, quality filters with recorded reasons, dedup, decode errors.
The shot detectors themselves are tested in test_shots.py."""

import json
import os
import shutil

import numpy as np
import pytest

from mugv.data import video
from mugv_data import clips
from mugv_data.clips import FilterConfig

SIZE = 64
# Scene tints. Consecutive seeds used as neighbouring shots below differ by a PySceneDetect content
# score of 36 or more (threshold 27); 3 → 4 scores only 26, so no test puts those side by side.
PALETTE = [(120, 120, 120), (70, 70, 180), (180, 70, 70), (70, 180, 70), (180, 180, 70), (70, 180, 180), (180, 70, 180)]


def textured_scene(seed: int, num_frames: int, *, shift: int = 3, blur: bool = False) -> np.ndarray:
    """A 4-px block texture (Laplacian variance ≈ 700, inside [200, 2000]) scrolling `shift` px
    per frame; `blur` box-filters it far below 200."""
    rng = np.random.default_rng(seed)
    tint = np.array(PALETTE[seed % len(PALETTE)], np.float64)
    base = (tint + rng.uniform(-40, 40, (SIZE // 4, SIZE // 4, 1))).repeat(4, 0).repeat(4, 1)
    if blur:
        k = 9
        pad = np.pad(base, ((k // 2,) * 2, (k // 2,) * 2, (0, 0)), mode="wrap")
        base = np.mean([pad[i : i + SIZE, j : j + SIZE] for i in range(k) for j in range(k)], axis=0)
    return np.stack([np.roll(base, shift * t, axis=1) for t in range(num_frames)]).clip(0, 255).astype(np.uint8)


def test_shot_split_finds_known_cuts():
    scenes = [textured_scene(s, n) for s, n in [(1, 12), (2, 9), (0, 15), (6, 10)]]
    frames = np.concatenate(scenes)
    shots = clips.shot_splitter(FilterConfig())(frames, 8.0)
    assert [(s.start, s.end) for s in shots] == [(0, 12), (12, 21), (21, 36), (36, 46)]
    assert shots[0].cut_in is None and shots[-1].cut_out is None
    assert all(a.cut_out is b.cut_in for a, b in zip(shots, shots[1:]))
    # The threshold is a knob: above every cut's content score nothing is cut.
    cfg = FilterConfig(shot_detectors=("content",), content_threshold=255.0)
    assert [(s.start, s.end) for s in clips.shot_splitter(cfg)(frames, 8.0)] == [(0, 46)]


def test_filters_drop_planted_bad_clips_with_reasons():
    fps = 8.0
    good = textured_scene(1, 16)
    black = np.full((16, SIZE, SIZE, 3), 3, np.uint8)
    static = textured_scene(2, 16, shift=0)
    blurry = textured_scene(3, 16, blur=True)
    short = textured_scene(0, 4)
    dup = good.copy()  # the same shot again later in the video: a near-duplicate
    frames = np.concatenate([good, black, static, blurry, short, dup])
    cfg = FilterConfig(min_seconds=1.0)
    recs = [r for _, r in clips.split_and_filter("planted.mp4", frames, fps, cfg)]
    got = [(r["start"], r["end"], r["kept"], r["reason"]) for r in recs]
    assert got == [
        (0, 16, True, None),
        (16, 32, False, "black"),
        (32, 48, False, "static"),
        (48, 64, False, "blurry"),
        (64, 68, False, "too_short"),
        (68, 84, False, "near_duplicate"),
    ]
    assert recs[5]["duplicate_of"] == recs[0]["clip_id"]
    # Every cut names the detectors that found it; the manifest's cuts are the shots' boundaries.
    assert all(r["shot_detector"] == "content+adaptive" for r in recs)
    assert recs[0]["cut_in"] is None and recs[-1]["cut_out"] is None
    for a, b in zip(recs, recs[1:]):
        assert a["cut_out"] == b["cut_in"] and a["cut_out"]["start"] == a["end"] == b["start"]
        assert a["cut_out"]["detectors"][0] == "content" and not a["cut_out"]["gradual"]
    assert 200 <= recs[0]["metrics"]["sharpness"] <= 2000
    # Farnebäck flow (the default motion scorer) measures the planted 3 px/frame scroll.
    assert recs[0]["motion_scorer"] == "farneback" and abs(recs[0]["metrics"]["motion"] - 3.0) < 0.1
    assert recs[2]["metrics"]["motion"] < 0.01
    assert recs[3]["metrics"]["sharpness"] < 200


def _write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    # crf 12: near lossless, so the sharpness and motion scorers measure the textures, not codec blur.
    video.write_mp4(path, frames, fps, crf=12)


def test_process_videos_records_corrupt_files_and_keeps_going(tmp_path):
    good = np.concatenate([textured_scene(5, 16), textured_scene(6, 16)])
    _write_mp4(str(tmp_path / "a_good.mp4"), good, 8)
    # Garbage with an mp4 name, and a real mp4 cut to its first 300 bytes.
    (tmp_path / "b_garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(2000))
    data = (tmp_path / "a_good.mp4").read_bytes()
    (tmp_path / "c_truncated.mp4").write_bytes(data[:300])
    shutil.copy(tmp_path / "a_good.mp4", tmp_path / "d_copy.mp4")
    paths = sorted(str(p) for p in tmp_path.glob("*.mp4"))
    manifest = str(tmp_path / "manifest.jsonl")
    kept = clips.process_videos(paths, manifest, FilterConfig(min_seconds=1.0))
    recs = clips.read_manifest(manifest)
    errors = {r["video"]: r for r in recs if r["reason"] == "decode_error"}
    assert set(errors) == {"b_garbage.mp4", "c_truncated.mp4"}
    assert all(r["error"] for r in errors.values())  # the FFmpeg error is named
    by_video = {}
    for r in recs:
        by_video.setdefault(r["video"], []).append(r)
    assert [(r["start"], r["end"], r["kept"]) for r in by_video["a_good.mp4"]] == [(0, 16, True), (16, 32, True)]
    # The byte-identical copy decodes to the same shots: both dropped as near-duplicates.
    assert [r["reason"] for r in by_video["d_copy.mp4"]] == ["near_duplicate", "near_duplicate"]
    assert [c.clip_id for c in kept] == ["a_good.mp4#0000", "a_good.mp4#0001"]
    assert kept[0].frames.shape == (16, SIZE, SIZE, 3) and kept[0].fps == 8.0
    assert not os.path.exists(manifest + ".tmp")
    json.dumps(recs)  # the manifest is plain JSON


def test_write_mp4_keeps_a_fractional_rate_and_leaves_nothing_half_written(tmp_path):
    # The one mp4 writer (the VAE's decode command and the main job's report use it).
    frames = textured_scene(1, 6)
    path = str(tmp_path / "a.mp4")
    assert video.write_mp4(path, frames, 29.97) == path
    back, fps = video.decode_video(path)
    assert back.shape == frames.shape and abs(fps - 29.97) < 1e-6
    assert np.abs(back.astype(int) - frames).mean() < 4  # crf 18: close to the input
    for bad, why in [(frames[:, :-1], "even frame sizes"), (frames.astype(np.float32), "uint8")]:
        with pytest.raises(ValueError, match=why) as e:
            video.write_mp4(str(tmp_path / "b.mp4"), bad, 8)
        assert str(tmp_path / "b.mp4") in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["a.mp4"]


def test_decode_error_names_the_file(tmp_path):
    p = tmp_path / "x.mp4"
    p.write_bytes(b"not a video")
    err = None
    try:
        video.decode_video(str(p))
    except video.VideoDecodeError as e:
        err = e
    assert err is not None and err.path == str(p) and str(p) in str(err)


def _decode_ignoring_errors(path):
    import av

    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_changed_bytes_that_decode_without_an_exception_mark_the_video_damaged(tmp_path):
    """FFmpeg conceals bitstream errors: a few changed bytes in an mp4 decoded 'fine' with frames
    wrong and prepare encoded them. The errors the decoder logs now make the video damaged,
    listed in the manifest with no clip kept. (A change that still decodes as a valid bitstream
    cannot be told from the video alone: docs/data.md.)"""
    frames = np.concatenate([textured_scene(5, 16), textured_scene(6, 16)])
    good = str(tmp_path / "good.mp4")
    _write_mp4(good, frames, 8)
    ref = _decode_ignoring_errors(good)
    data = open(good, "rb").read()
    damaged = str(tmp_path / "damaged.mp4")
    for offset in range(len(data) // 2, len(data) - 16, 211):
        changed = bytearray(data)
        changed[offset : offset + 8] = bytes(b ^ 0xFF for b in changed[offset : offset + 8])
        open(damaged, "wb").write(changed)
        try:
            got = _decode_ignoring_errors(damaged)
        except Exception:  # noqa: BLE001 -- refused outright: not the silent case looked for
            continue
        if got.shape != ref.shape or np.array_equal(got, ref):
            continue
        try:
            video.decode_video(damaged)
        except video.VideoDecodeError as e:
            assert e.damaged and "damaged: the decoder reported" in e.reason
            break
    else:
        pytest.fail("no byte change that decoded silently to wrong frames is reported now")
    recs, kept = clips.process_video(damaged, FilterConfig(min_seconds=1.0))
    assert kept == [] and [(r["reason"], r["video"]) for r in recs] == [("damaged", "damaged.mp4")]
    assert "decoder reported" in recs[0]["error"]
    video.decode_video(good)  # an intact file decodes as before
