"""Rectified-flow sampler: golden sampler vectors, timestep shift, CLI."""

import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mugv_jax.dit as dit
from mugv_jax.sample import sampler
from tests.helpers import DIT_WEIGHTS, dit_vectors, max_abs

GOLDEN_ATOL = 1e-4
# The golden sampler case was generated with fps conditioning 24 (30 gives a 0.7 max error).
GOLDEN_FPS = 24.0


@pytest.fixture(scope="module")
def model():
    return dit.load(DIT_WEIGHTS, "tiny")


def test_golden_timesteps():
    v = dit_vectors()
    r = sampler.shift_ratio(720, 1280, 4)
    assert r == 3.75
    np.testing.assert_array_equal(sampler.sampling_timesteps(4, r), v["sampler.timesteps"])


def test_golden_i2v_sampling_with_guidance(model):
    v = dit_vectors()
    out = sampler.sample(
        model,
        v["sampler.in.z"],
        v["sampler.in.cond_y"],
        v["sampler.in.cond_mask"],
        v["sampler.in.neg_y"],
        v["sampler.in.neg_mask"],
        height=720,
        width=1280,
        num_steps=4,
        guidance_scale=4.0,
        frame_mask=v["sampler.in.i2v_mask"],
        noise=v["sampler.in.noise"],
        fps=GOLDEN_FPS,
    )
    assert max_abs(out, v["sampler.out"]) <= GOLDEN_ATOL
    # The conditioning frame is held exactly at its clean latent.
    np.testing.assert_array_equal(np.asarray(out)[:, :, 0], v["sampler.in.z"][:, :, 0])


@pytest.mark.parametrize(
    "h,w,t,want",
    [
        (1280, 720, 14, 7.0),
        (960, 960, 14, 7.0),
        (1280, 720, 10, 5.90625),
        (832, 1110, 14, 7.03125),
        (1108, 832, 14, 6.96875),
    ],
)
def test_bf16_shift_ratio_reproduces_release_table(h, w, t, want):
    # docs/reference.md §3.2: the release computes r in bf16.
    assert sampler.shift_ratio(h, w, t, round_to_bf16=True) == want
    assert abs(sampler.shift_ratio(h, w, t) - want) > 1e-3


def test_release_720p_time_grid():
    grid = sampler.sampling_timesteps(25, 7.0)
    # docs/reference.md §3.2 lists t' for r = 7.0 to two decimals.
    assert grid[0] == 1000.0 and abs(grid[1] - 994.08) < 5e-3 and abs(grid[-1] - 225.81) < 5e-3


def test_text_to_video_sampling_is_seeded_and_finite(model):
    v = dit_vectors()
    kw = dict(height=48, width=64, num_steps=3, fps=30.0)
    z = np.zeros((1, 24, 3, 6, 8), np.float32)
    args = (
        v["sampler.in.cond_y"],
        v["sampler.in.cond_mask"],
        v["sampler.in.neg_y"][:, :, :7],
        v["sampler.in.neg_mask"][:, :7],
    )
    import jax

    a = sampler.sample(model, z, *args, key=jax.random.PRNGKey(1), **kw)
    b = sampler.sample(model, z, *args, key=jax.random.PRNGKey(1), **kw)
    c = sampler.sample(model, z, *args, key=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.isfinite(np.asarray(a))) and max_abs(a, c) > 1e-2


def test_sample_cli_rejects_bad_text_features(tmp_path):
    text = tmp_path / "text.safetensors"
    save_file({"y": np.zeros((1, 1, 4, 32), np.float32)}, str(text))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mugv_jax.sample",
            f"--checkpoint={DIT_WEIGHTS}",
            "--model=tiny",
            f"--text={text}",
            f"--out={tmp_path / 'o.safetensors'}",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "lacks tensor(s) ['mask']" in res.stderr and str(text) in res.stderr


# --- the unconditional input (issue 16 item 3) -----------------------------------------------


def _release_with_sidecar(tmp_path, seed=3):
    """A copy of the tiny golden weights with a null-caption sidecar next to it, as the exporters
    write it; returns (weights path, null caption [max_text_tokens, D])."""
    import shutil

    from mugv.config import get_config
    from mugv.io import null_text as null_lib

    cfg = get_config("tiny")
    weights = str(tmp_path / "dit_ema.safetensors")
    shutil.copy(DIT_WEIGHTS, weights)
    null = (
        np.random.default_rng(seed).standard_normal((cfg.max_text_tokens, cfg.text_dim)) / np.sqrt(cfg.text_dim)
    ).astype(np.float32)
    null_lib.save(null_lib.sidecar_path(weights), null, source="test")
    return weights, null


def _cond_text(tmp_path):
    v = dit_vectors()
    text = tmp_path / "prompt.safetensors"
    save_file({"y": v["sampler.in.cond_y"], "mask": v["sampler.in.cond_mask"]}, str(text))
    return str(text), v["sampler.in.cond_y"], v["sampler.in.cond_mask"]


def test_unconditional_input_defaults_to_the_checkpoints_null_caption(tmp_path):
    from mugv.io import null_text as null_lib
    from mugv_jax.sample import cli as sample

    weights, null = _release_with_sidecar(tmp_path)
    assert null_lib.sidecar_path(weights) == str(tmp_path / "dit_ema.safetensors.null_text.safetensors")
    text_path, y, mask = _cond_text(tmp_path)
    length = y.shape[2]
    kw = dict(text_path=text_path, checkpoint=weights, zeros=False, text_dim=null.shape[1])
    neg_y, neg_mask, what = sample.unconditional_input({"y": y, "mask": mask}, null_text=None, **kw)
    # Exactly what the trainer feeds for a dropped caption: null rows [:L], every row valid.
    np.testing.assert_array_equal(neg_y, null[None, None, :length])
    np.testing.assert_array_equal(neg_mask, np.ones((1, length), np.int32))
    assert null_lib.sidecar_path(weights) in what
    # --null_text names another file (.npy, as the main job's dit stage keeps) and wins.
    other = np.full_like(null, 0.5)
    np.save(tmp_path / "other.npy", other)
    neg_y, _, _ = sample.unconditional_input({"y": y, "mask": mask}, null_text=str(tmp_path / "other.npy"), **kw)
    np.testing.assert_array_equal(neg_y, other[None, None, :length])
    # A negative prompt in --text is used as given.
    neg = {"y": y, "mask": mask, "neg_y": y * 2, "neg_mask": mask}
    neg_y, _, what = sample.unconditional_input(neg, null_text=None, **kw)
    np.testing.assert_array_equal(neg_y, y * 2)
    assert what == "the negative prompt in --text"


def test_unconditional_input_errors_name_what_was_looked_for(tmp_path):
    from absl import app

    from mugv_jax.sample import cli as sample

    text_path, y, mask = _cond_text(tmp_path)
    weights = str(tmp_path / "bare.safetensors")  # no sidecar
    kw = dict(text_path=text_path, checkpoint=weights, text_dim=64)
    with pytest.raises(app.UsageError) as e:
        sample.unconditional_input({"y": y, "mask": mask}, null_text=None, zeros=False, **kw)
    assert str(tmp_path / "bare.safetensors.null_text.safetensors") in str(e.value)
    assert "--null_text" in str(e.value) and "--zero_null_text" in str(e.value) and text_path in str(e.value)
    with pytest.raises(app.UsageError, match="null caption file not found: .*missing.safetensors"):
        sample.unconditional_input(
            {"y": y, "mask": mask}, null_text=str(tmp_path / "missing.safetensors"), zeros=False, **kw
        )
    save_file({"wrong": np.zeros((16, 64), np.float32)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(app.UsageError, match="bad.safetensors lacks tensor 'null_text'"):
        sample.unconditional_input(
            {"y": y, "mask": mask}, null_text=str(tmp_path / "bad.safetensors"), zeros=False, **kw
        )
    np.save(tmp_path / "narrow.npy", np.zeros((16, 32), np.float32))
    with pytest.raises(app.UsageError, match="text_dim 32, the model has 64"):
        sample.unconditional_input({"y": y, "mask": mask}, null_text=str(tmp_path / "narrow.npy"), zeros=False, **kw)
    np.save(tmp_path / "short.npy", np.zeros((4, 64), np.float32))
    with pytest.raises(app.UsageError, match="caption length 10 exceeds the null caption's 4 rows"):
        sample.unconditional_input({"y": y, "mask": mask}, null_text=str(tmp_path / "short.npy"), zeros=False, **kw)
    with pytest.raises(app.UsageError, match="give one"):
        sample.unconditional_input({"y": y, "mask": mask}, null_text=str(tmp_path / "short.npy"), zeros=True, **kw)
    # Zeros only on request.
    neg_y, neg_mask, _ = sample.unconditional_input({"y": y, "mask": mask}, null_text=None, zeros=True, **kw)
    assert not neg_y.any() and neg_mask.shape == (1, 10) and neg_mask.all()


def test_sample_cli_guides_against_the_trained_null_caption(tmp_path, model):
    """Black box: the CLI without a negative prompt samples exactly what the sampler gives with
    the sidecar's null caption as the unconditional input, and not what it gives with zeros (the
    CLI's input before the sidecar existed). It writes atomically. Without --model it takes the
    checkpoint's config (issue 25: the default was 10b), and the VAE decoder's reader takes its
    metadata (issue 25: it refused the sample command's plain strings)."""
    import jax

    weights, null = _release_with_sidecar(tmp_path)
    text_path, y, mask = _cond_text(tmp_path)
    out = tmp_path / "out" / "lat.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "mugv_jax.sample",
        f"--checkpoint={weights}",
        f"--text={text_path}",
        "--num_frames=17",
        "--height=48",
        "--width=64",
        "--micro_frame_size=0",
        "--steps=2",
        f"--out={out}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (
        f"unconditional input: the trained null caption from {tmp_path / 'dit_ema.safetensors.null_text.safetensors'}"
        in res.stderr
    )
    assert "sampling" in res.stderr  # the progress bar
    assert "(config detected from the shapes: tiny)" in res.stderr  # the golden file stores none
    assert [p.name for p in out.parent.iterdir()] == ["lat.safetensors"]  # no temp file left
    got = load_file(str(out))["latents"]
    assert got.shape == (1, 24, 3, 6, 8) and np.all(np.isfinite(got))
    z = np.zeros((1, 24, 3, 6, 8), np.float32)
    kw = dict(height=48, width=64, num_steps=2, guidance_scale=4.0, key=jax.random.PRNGKey(42), fps=30.0)
    want = np.asarray(sampler.sample(model, z, y, mask, *sampler.null_caption_input(null, y.shape[2]), **kw))
    zeros = np.asarray(sampler.sample(model, z, y, mask, np.zeros_like(y), np.ones_like(mask), **kw))
    # Same computation in two processes (XLA CPU): equal to float32 round-off.
    assert max_abs(got, want) <= 1e-5
    assert max_abs(want, zeros) > 1e-2  # the unconditional input matters at this scale

    # The decoder's reader (mugv/io/latents.py) takes the sample's metadata typed: 17 frames at
    # 48×64 and the conditioning fps (the journey test decodes such a file to mp4).
    from mugv.io import latents
    from mugv_jax.vae import __main__ as vae_cli

    assert vae_cli.latents_file is latents
    _, meta = latents.read(str(out))
    assert (meta["num_frames"], meta["height"], meta["width"], meta["fps"]) == (17, 48, 64, 30.0)
    assert meta["model"] == "tiny" and meta["steps"] == 2


def test_sample_cli_without_null_caption_stops_before_loading(tmp_path):
    text_path, _, _ = _cond_text(tmp_path)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mugv_jax.sample",
            f"--checkpoint={DIT_WEIGHTS}",
            "--model=tiny",
            f"--text={text_path}",
            f"--out={tmp_path / 'o.safetensors'}",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "weights.safetensors.null_text.safetensors does not exist" in res.stderr and "--zero_null_text" in res.stderr
    assert "loading" not in res.stderr and not (tmp_path / "o.safetensors").exists()


# --- the release's edges (issue 27 item 6) ----------------------------------------------------


def _release_shift(t: np.ndarray, height: int, width: int, frames: int) -> np.ndarray:
    """The release's `timestep_transform` with its bf16 size tensors, in torch: the ratio is
    bf16, `ratio - 1` a bf16 tensor minus a number (bf16), the products promote to float32."""
    import torch

    bf = lambda v: torch.tensor([float(v)], dtype=torch.bfloat16)  # noqa: E731
    ratio = ((bf(height) * bf(width)) / (512 * 512)).sqrt() * bf(frames).sqrt() * 1.0
    tau = torch.from_numpy(np.asarray(t, np.float32)) / 1000
    return (ratio * tau / (1 + (ratio - 1) * tau) * 1000).numpy()


def test_bf16_shift_rounds_ratio_minus_one_like_the_release():
    """Below r = 0.5 the release's `ratio - 1` drops the low bits of its bf16 ratio; with
    round_shift_to_bf16 the grid is the release's bit for bit, at toy and at release sizes."""
    raw = np.array([(1.0 - i / 25) * 1000 for i in range(25)], np.float32)
    differs = 0
    for h, w, t in [(1280, 720, 14), (720, 1280, 4), (48, 40, 1), (56, 40, 2), (40, 24, 3), (64, 64, 1), (24, 24, 1)]:
        r = sampler.shift_ratio(h, w, t, round_to_bf16=True)
        grid = sampler.sampling_timesteps(25, r, round_to_bf16=True)
        np.testing.assert_array_equal(grid, _release_shift(raw, h, w, t))
        differs += not np.array_equal(grid, sampler.sampling_timesteps(25, r))
    assert differs >= 1  # the toy sizes where r − 1 rounds


def test_per_sample_frame_indices_are_taken_for_each_sample(model):
    """frame_indice [B, T+2] with B > 1 (the release sampler takes it): each sample is sampled
    with its own temporal positions, as when the whole batch has that sample's (one compile:
    every call has the same shapes)."""
    v = dit_vectors()
    z = np.zeros((2, 24, 3, 6, 8), np.float32)
    noise = np.random.default_rng(0).standard_normal(z.shape).astype(np.float32)
    text = [np.repeat(v[f"sampler.in.{k}"], 2, 0) for k in ("cond_y", "cond_mask", "neg_y", "neg_mask")]
    a, b = np.array([0, 1, 2, 3, 4], np.int32), np.array([0, 3, 6, 9, 12], np.int32)
    kw = dict(height=48, width=64, num_steps=2, fps=30.0, noise=noise)
    mixed = np.asarray(sampler.sample(model, z, *text, frame_indice=np.stack([a, b]), **kw))
    all_a = np.asarray(sampler.sample(model, z, *text, frame_indice=np.stack([a, a]), **kw))
    all_b = np.asarray(sampler.sample(model, z, *text, frame_indice=np.stack([b, b]), **kw))
    assert max_abs(mixed[0], all_a[0]) <= 1e-5 and max_abs(mixed[1], all_b[1]) <= 1e-5
    assert max_abs(all_a[1], all_b[1]) > 1e-3  # the positions matter
    with pytest.raises(ValueError, match=r"frame_indice must be \[1, T\+2\] or per sample \[B, T\+2\] = \[2, 5\]"):
        sampler.sample(model, z, *text, frame_indice=np.stack([a, b])[:, :4], **kw)
