"""Rectified-flow sampler: golden sampler vectors, timestep shift, CLI."""
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mugv_jax.dit as dit
from mugv_jax import sampler
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
    out = sampler.sample(model, v["sampler.in.z"], v["sampler.in.cond_y"], v["sampler.in.cond_mask"],
                         v["sampler.in.neg_y"], v["sampler.in.neg_mask"], height=720, width=1280,
                         num_steps=4, guidance_scale=4.0, frame_mask=v["sampler.in.i2v_mask"],
                         noise=v["sampler.in.noise"], fps=GOLDEN_FPS)
    assert max_abs(out, v["sampler.out"]) <= GOLDEN_ATOL
    # The conditioning frame is held exactly at its clean latent.
    np.testing.assert_array_equal(np.asarray(out)[:, :, 0], v["sampler.in.z"][:, :, 0])


@pytest.mark.parametrize("h,w,t,want", [
    (1280, 720, 14, 7.0), (960, 960, 14, 7.0), (1280, 720, 10, 5.90625),
    (832, 1110, 14, 7.03125), (1108, 832, 14, 6.96875)])
def test_bf16_shift_ratio_reproduces_release_table(h, w, t, want):
    # paper.md §4.2: the release computes r in bf16.
    assert sampler.shift_ratio(h, w, t, round_to_bf16=True) == want
    assert abs(sampler.shift_ratio(h, w, t) - want) > 1e-3


def test_release_720p_time_grid():
    grid = sampler.sampling_timesteps(25, 7.0)
    # paper.md §4.2 lists t' for r = 7.0 to two decimals.
    assert grid[0] == 1000.0 and abs(grid[1] - 994.08) < 5e-3 and abs(grid[-1] - 225.81) < 5e-3


def test_text_to_video_sampling_is_seeded_and_finite(model):
    v = dit_vectors()
    kw = dict(height=48, width=64, num_steps=3, fps=30.0)
    z = np.zeros((1, 24, 3, 6, 8), np.float32)
    args = (v["sampler.in.cond_y"], v["sampler.in.cond_mask"], v["sampler.in.neg_y"][:, :, :7],
            v["sampler.in.neg_mask"][:, :7])
    import jax
    a = sampler.sample(model, z, *args, key=jax.random.PRNGKey(1), **kw)
    b = sampler.sample(model, z, *args, key=jax.random.PRNGKey(1), **kw)
    c = sampler.sample(model, z, *args, key=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.isfinite(np.asarray(a))) and max_abs(a, c) > 1e-2


def test_sample_cli_writes_latents_atomically(tmp_path):
    v = dit_vectors()
    text = tmp_path / "text.safetensors"
    save_file({"y": v["sampler.in.cond_y"], "mask": v["sampler.in.cond_mask"],
               "neg_y": v["sampler.in.neg_y"], "neg_mask": v["sampler.in.neg_mask"]}, str(text))
    out = tmp_path / "out" / "lat.safetensors"
    cmd = [sys.executable, "-m", "mugv_jax.sample", f"--checkpoint={DIT_WEIGHTS}", "--model=tiny",
           f"--text={text}", "--num_frames=17", "--height=48", "--width=64", "--micro_frame_size=0",
           "--steps=2", f"--out={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    lat = load_file(str(out))["latents"]
    assert lat.shape == (1, 24, 3, 6, 8) and np.all(np.isfinite(lat))
    assert "sampling" in res.stderr  # the progress bar
    assert [p.name for p in out.parent.iterdir()] == ["lat.safetensors"]  # no temp file left


def test_sample_cli_rejects_bad_text_features(tmp_path):
    text = tmp_path / "text.safetensors"
    save_file({"y": np.zeros((1, 1, 4, 32), np.float32)}, str(text))
    res = subprocess.run([sys.executable, "-m", "mugv_jax.sample", f"--checkpoint={DIT_WEIGHTS}",
                          "--model=tiny", f"--text={text}", f"--out={tmp_path / 'o.safetensors'}"],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "lacks tensor(s) ['mask']" in res.stderr and str(text) in res.stderr
