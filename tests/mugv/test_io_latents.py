"""mugv/io/latents.py, the one owner of latents files (issue 25 item 1): what the sample command
and the VAE encoder write, the VAE decoder reads, with typed metadata."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mugv.io import latents


def test_safetensors_round_trip_keeps_types(tmp_path):
    z = np.random.default_rng(0).standard_normal((1, 24, 3, 6, 8)).astype(np.float32)
    path = str(tmp_path / "sub" / "lat.safetensors")  # a missing parent is made
    meta = {"num_frames": 17, "height": 45, "width": 64, "fps": 30, "model": "tiny", "seed": 42, "cfg_scale": 4.0}
    latents.write(path, z, meta)
    got, back = latents.read(path)
    np.testing.assert_array_equal(got, z)
    assert back == {**meta, "fps": 30.0}
    assert isinstance(back["num_frames"], int) and isinstance(back["fps"], float)
    # Each header value is JSON (what a reader that parses every value, like the old decoder, takes).
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))["__metadata__"]
    assert {k: json.loads(v) for k, v in header.items()}["height"] == 45
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["lat.safetensors"]


def test_npy_with_sidecar_and_one_video_shape(tmp_path):
    z = np.ones((24, 2, 3, 4), np.float32)
    path = str(tmp_path / "clip.npy")
    latents.write(path, z, {"name": "clip", "num_frames": 9, "fps": 8.0, "height": 24, "width": 32}, sidecar=True)
    got, meta = latents.read(path)
    assert got.shape == (1, 24, 2, 3, 4) and meta["num_frames"] == 9 and meta["name"] == "clip"
    assert json.load(open(tmp_path / "clip.json"))["fps"] == 8.0


def test_sample_files_of_the_old_writer_are_read(tmp_path):
    """Before this module the sample command wrote plain strings (`pixel_size "17x64x112"`)."""
    path = str(tmp_path / "old.safetensors")
    old = {"checkpoint": "/m/dit.pt", "model": "tiny", "steps": "2", "pixel_size": "17x64x112"}
    save_file({"latents": np.zeros((1, 24, 3, 8, 14), np.float32)}, path, metadata=old)
    _, meta = latents.read(path)
    assert (meta["num_frames"], meta["height"], meta["width"]) == (17, 64, 112)
    assert meta["model"] == "tiny" and meta["checkpoint"] == "/m/dit.pt"


def test_refusals_name_the_file_and_field(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    save_file({"latents": np.zeros((1, 24, 1, 2, 2), np.float32)}, path, metadata={"num_frames": '"17"'})
    with pytest.raises(ValueError, match=r"bad.safetensors: metadata num_frames='17' must be int"):
        latents.read(path)
    save_file({"z": np.zeros((1, 2), np.float32)}, path)
    with pytest.raises(ValueError, match=r"bad.safetensors has no tensor 'latents' \(found \['z'\]\)"):
        latents.read(path)
    save_file({"latents": np.zeros((2, 2), np.float32)}, path)
    with pytest.raises(ValueError, match=r"must be \[C, T', h, w\].*\[2, 2\]"):
        latents.read(path)
    with pytest.raises(ValueError, match="must be int"):
        latents.write(str(tmp_path / "x.safetensors"), np.zeros((1, 1, 1, 1)), {"height": "64"})
    with pytest.raises(ValueError, match=r"x.pt: latents go to .safetensors or .npy"):
        latents.write(str(tmp_path / "x.pt"), np.zeros((1, 1, 1, 1)), {})
    assert not list(tmp_path.glob("x.*"))
    assert load_file(path)["latents"].shape == (2, 2)
