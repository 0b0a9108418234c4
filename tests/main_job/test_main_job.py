"""The main job end to end, shortened (configs/main.py:quick): procedural + bundled clips → VAE
training → shards → MUG-DiT training with the real trainer → held-out text-to-video and
image-to-video samples → mp4s, grids, report, and the report in a headless browser. One run per
test process (`quick_run`), shared by every test of this file."""

import atexit
import json
import os
import shutil
import tempfile
import time

import numpy as np

from configs import main as main_config
from main_job import browser
from main_job import run as main_run
from main_job.run import ORDER

# The thresholds are configs/main.py:quick `check` (shares of the 24 held-out samples per mode);
# docs/main_job.md records what the quick run measured and the chance levels (direction 1/4,
# colour+direction 1/24).


_RUN: dict = {}


def quick_run():
    """(workdir, config, summary) of the one quick run of this test process. A failed run is
    remembered too, so each test reports it instead of running the pipeline again."""
    if not _RUN:
        workdir = tempfile.mkdtemp(prefix="mugv-main-job-")
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        config = main_config.get_config("quick")
        try:
            _RUN["result"] = (workdir, config, main_run.run(config, workdir))
        except Exception as e:  # re-raised below, in this and every later test
            _RUN["error"] = e
    if "error" in _RUN:
        raise RuntimeError("the quick main-job run failed (see the first failing test)") from _RUN["error"]
    return _RUN["result"]


def test_model_learned_the_motion_direction_of_held_out_prompts():
    _, config, summary = quick_run()
    checks, want = summary["checks"], config.check
    assert checks["t2v"]["samples"] == checks["i2v"]["samples"] == 6 * config.sample.seeds
    print(json.dumps(checks))  # shown with -s, and in full on failure
    for mode in ("t2v", "i2v"):
        c = checks[mode]
        assert c["latent_direction_share"] >= want[f"{mode}_direction"], (mode, json.dumps(checks))
        assert c["latent_colour_share"] >= want[f"{mode}_colour"], (mode, json.dumps(checks))
        assert c["pixel_direction_share"] >= want[f"{mode}_pixel_direction"], (mode, json.dumps(checks))


def test_vae_keeps_held_out_clips_and_decodes_them_in_order():
    """The prompts' ground truths (never trained on) through the quick run's VAE. The earlier VAE
    (no first-frame crops, random posterior noise, frames decoded out of order) gave 16–17 dB."""
    workdir, config, summary = quick_run()
    held = summary["vae_held_out"]
    assert held["clips"] == 6 and held["psnr"] == summary["vae_psnr_held_out"]
    assert held["psnr"] >= config.check.vae_psnr_held_out, json.dumps(held)
    # Pooled MSE is the mean of the clips' MSEs: the per-clip figures must pool back to it.
    per_clip_mse = [10 ** (-p / 10) for p in held["psnr_per_clip"]]
    assert len(per_clip_mse) == 6
    assert abs(-10 * np.log10(np.mean(per_clip_mse)) - held["psnr"]) < 1e-3, json.dumps(held)
    report = open(os.path.join(workdir, "report.html")).read()
    assert f"ground truth through the VAE: {held['psnr_per_clip'][0]:.1f} dB" in report


def test_every_stage_ran_and_left_its_outputs():
    workdir, config, summary = quick_run()
    assert summary["stages_run"] == list(ORDER) and summary["stages_reused"] == []
    assert summary["vae"]["trained"] and summary["vae"]["steps"] == config.vae.num_steps
    assert summary["vae"]["psnr_after"] > summary["vae"]["psnr_before"]
    assert summary["dit"]["steps"] == config.dit.num_steps
    dit_dir = os.path.join(workdir, "dit")
    assert sorted(os.listdir(os.path.join(dit_dir, "checkpoints")))  # orbax step directories
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(dit_dir, "tensorboard")))
    rows = [json.loads(line) for line in open(os.path.join(dit_dir, "tensorboard", "metrics.jsonl"))]
    assert rows[-1]["step"] == config.dit.num_steps and rows[-1]["tokens_per_second"] > 0
    assert rows[-1]["tflops_per_device"] > 0
    index = json.load(open(os.path.join(workdir, summary["encode"]["dataset"], "index.json")))
    assert index["num_examples"] == summary["data"]["num_train"] and index["text_dim"] == 384


def test_exported_dit_weights_carry_the_trained_null_caption():
    # python -m mugv_jax.sample --checkpoint=<dit_ema.safetensors> finds it without flags.
    from mugv.io import null_text

    workdir, _, summary = quick_run()
    side = null_text.load(null_text.sidecar_path(os.path.join(workdir, summary["dit"]["weights"])))
    trained = np.load(os.path.join(workdir, "dit", "null_text.npy"))  # the train state's, as saved
    assert side.shape == (summary["dit"]["model_config"]["max_text_tokens"], 384)
    np.testing.assert_array_equal(side, trained)


def test_sampled_videos_are_playable_mp4s_of_the_clip_length():
    import av

    workdir, config, summary = quick_run()
    sample = json.load(open(os.path.join(workdir, "sample", "DONE.json")))
    size = config.data.size * config.sample.upscale
    shown = [s for s in sample["samples"] if "video" in s]
    assert len(shown) == 2 * len(sample["prompts"]) * config.sample.media_seeds
    for s in shown:
        with av.open(os.path.join(workdir, s["video"])) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == config.data.frames and frames[0].shape == (size, size, 3), s["video"]
    assert {s["mode"] for s in sample["samples"]} == {"t2v", "i2v"}
    assert {s["kind"] for s in sample["samples"]} == {"held-out", "real"}


def test_report_names_its_figures_config_and_throughput():
    workdir, _, summary = quick_run()
    page = open(summary["report"]).read()
    for needle in (
        "loss_dit.png",
        "Throughput",
        "tokens / s",
        "MFU",
        "&quot;procedural_count&quot;",
        "held-out combination",
        "media-check",
    ):
        assert needle in page, needle
    from PIL import Image

    with Image.open(os.path.join(workdir, "loss_dit.png")) as im:
        assert im.size[0] > 100 and np.asarray(im).std() > 0


def test_second_run_reuses_every_stage_and_redo_repeats_only_what_was_asked():
    workdir, config, first = quick_run()
    t0 = time.time()
    again = main_run.run(config, workdir)
    assert again["stages_run"] == [] and again["stages_reused"] == list(ORDER)
    assert again["checks"] == first["checks"] and time.time() - t0 < first["wall_seconds"]


def _decoded_frame_sources(num_frames, micro, asked=None):
    """Which input frame each frame of decode(encode(clip), asked) stands for, from the encode and
    decode plans alone (mugv_jax/vae/windows.py)."""
    from mugv_jax.vae.windows import ZERO, decode_windows, encode_calls

    groups = [g for call in encode_calls(num_frames, micro) for g in call]
    out = []
    for w in decode_windows(len(groups), asked or num_frames, micro):
        out += [s for g in groups[w.latent_start : w.latent_stop] for s in g][w.crop_front :]
    return ["zero" if s == ZERO else s for s in out]


def test_main_job_decodes_its_clips_in_frame_order():
    """Asked for 17 frames, the release's windowing returns [f0 ×7, f0..f8, f16] for a 17-frame
    clip whenever the clip spans more than one chunk (the tiny preset's 16 frames). The main job
    asks for the padded 24 frames and drops the first 7, which is in order for any chunking."""
    from main_job.run import padded_frames

    assert _decoded_frame_sources(17, 16) == [0] * 8 + list(range(1, 9)) + [16]
    for micro in (8, 16, 24, 48, None):
        for t in (17, 9, 16, 20, 33):
            p = padded_frames(t)
            assert _decoded_frame_sources(t, micro, p)[p - t :] == list(range(t)), (micro, t)


# --- the report in a real headless browser (Debian's Chromium; MUGV_CHROMIUM names it): every
# <img> decodes and every <video> loads its metadata; the check itself is shown to fail on a
# corrupted PNG and a truncated mp4. In this file so that pytest-xdist's per-file scheduling gives
# it the same worker, and so the same quick run, as the tests above (in a file of its own it paid
# for a second quick run: 6 minutes of the suite).


def test_every_image_and_video_of_the_report_loads_in_chromium():
    workdir, _, summary = quick_run()
    result = browser.check_report(summary["report"])
    page = open(summary["report"]).read()
    assert len(result["images"]) == page.count("<img ") >= 2 + 6 * 2 * 2
    assert len(result["videos"]) == page.count("<video ") >= 6 * 2 * 2
    assert browser.broken(result) == []
    assert all(v["duration"] > 0 and v["readyState"] >= 1 for v in result["videos"])


def test_the_browser_check_fails_on_a_broken_image_and_a_broken_video(tmp_path):
    workdir, _, summary = quick_run()
    copy = tmp_path / "report"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("dit", "vae", "encode", "data"))
    (copy / "loss_dit.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    video = copy / "sample" / "t2v_00_0.mp4"
    video.write_bytes(video.read_bytes()[:64])
    result = browser.check_report(str(copy / "report.html"))
    bad = sorted(m["src"] for kind in ("images", "videos") for m in result[kind] if not m["ok"])
    # Each element that shows one of the two broken files is reported (the sample video is on the
    # page twice: in the at-a-glance table and in its prompt's section), and nothing else.
    page = (copy / "report.html").read_text()
    assert sorted(set(bad)) == ["loss_dit.png", "sample/t2v_00_0.mp4"], bad
    assert bad.count("sample/t2v_00_0.mp4") == page.count('src="sample/t2v_00_0.mp4"') == 2, bad
