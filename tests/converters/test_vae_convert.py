"""The video VAE through `python -m converters convert`: release `.pt` ⇄ `.safetensors`
bit-exact (the `.pt` is what the official loader's `torch.load` takes), a VAE training run's
checkpoint to release files, every input checked against the release VAE schema."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from converters import cli
from converters.convert import convert
from mugv.vae_config import get_vae_config, release_vae_schema
from tests.helpers import GOLDEN

VAE_WEIGHTS = os.path.join(GOLDEN, "vae_tiny", "weights.safetensors")


@pytest.fixture(scope="module")
def weights():
    return load_file(VAE_WEIGHTS)


def test_release_vae_pt_and_safetensors_round_trip_bit_exactly(weights, tmp_path, capsys):
    pt, st = str(tmp_path / "vae.pt"), str(tmp_path / "vae.safetensors")
    assert cli.main(["convert", "--src", VAE_WEIGHTS, "--dst", f"release:{pt}", "--quiet"]) == 0
    assert "null caption" not in capsys.readouterr().out  # a DiT's concern, not the VAE's
    loaded = torch.load(pt, weights_only=True)  # the official VAE loader's read
    assert list(loaded) == list(release_vae_schema(get_vae_config("tiny")))
    assert loaded["logvar"].shape == () and all(np.array_equal(loaded[k].numpy(), weights[k]) for k in weights)
    r = convert(pt, f"release:{st}")
    assert r.config == get_vae_config("tiny") and "tiny" in r.config_origin
    back = load_file(st)
    assert set(back) == set(weights) and all(
        back[k].dtype == weights[k].dtype and np.array_equal(back[k], weights[k]) for k in weights
    )
    # Our own safetensors store the VAE config; a bf16 cast rounds like torch.
    convert(st, f"release:{tmp_path / 'bf16.pt'}", dtype="bfloat16")
    half = torch.load(tmp_path / "bf16.pt", weights_only=True)
    assert all(torch.equal(half[k], torch.from_numpy(weights[k]).to(torch.bfloat16)) for k in weights)


def test_a_vae_that_does_not_match_its_schema_is_refused_naming_the_tensor(weights, tmp_path):
    bad = dict(weights)
    del bad["temporal_vae.encoder.conv2.conv.weight"]
    bad["spatial_vae.module.decoder.conv_out.bias"] = np.zeros(5, np.float32)
    src = str(tmp_path / "bad.safetensors")
    save_file(bad, src)
    with pytest.raises(ValueError, match=r"temporal_vae\.encoder\.conv2\.conv\.weight"):
        convert(src, f"release:{tmp_path / 'x.pt'}", model="tiny")
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.bias: shape \[5\]"):
        convert(src, f"release:{tmp_path / 'x.pt'}", model="tiny")
    with pytest.raises(ValueError, match="match no preset"):
        convert(src, f"release:{tmp_path / 'x.pt'}")
    assert not os.path.exists(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="a VAE is written as release files"):
        convert(VAE_WEIGHTS, f"jax:{tmp_path / 'j'}")


def vae_run(root) -> tuple[str, object, np.ndarray, np.ndarray]:
    """A VAE training run's checkpoint at step 7 (the trainer's flat leaves of a fresh tiny VAE),
    without its result file: (workdir, trainer, shift, scale to finish it with)."""
    from configs import vae_tiny
    from mugv_jax.train.checkpointing import Checkpointer
    from mugv_jax.vae.trainer import Trainer
    from mugv_jax.vae.training import _flat

    vae_cfg = get_vae_config("tiny")
    trainer = Trainer(vae_tiny.get_config(), vae_cfg)
    workdir = os.path.join(str(root), "run")
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), use_async=False)
    ck.save(7, _flat(trainer.tree()), {"position": 0}, {"vae_config": vae_cfg.to_dict()}, force=True)
    ck.close()
    c = vae_cfg.embed_dim
    return workdir, trainer, np.linspace(-1, 1, c, dtype=np.float32), np.linspace(0.5, 2, c, dtype=np.float32)


def finish(workdir: str, shift, scale) -> None:
    from mugv.io.atomic import write_json
    from mugv_jax.vae.training import RESULT_NAME

    write_json(os.path.join(workdir, RESULT_NAME), {"steps": 7, "shift": shift.tolist(), "scale": scale.tolist()})


def test_a_vae_training_run_converts_to_the_release_layout(tmp_path):
    """A VAE run's checkpoint (the trainer's flat leaves, params last) with its result file's
    latent statistics becomes the release layout the trainer's own export writes."""
    from mugv_jax.vae import checkpoint as vck

    workdir, trainer, shift, scale = vae_run(tmp_path)
    vae_cfg = get_vae_config("tiny")
    with pytest.raises(ValueError, match="shift/scale of step 7 are not known"):
        convert(f"jax:{workdir}", f"release:{tmp_path / 'early.pt'}")
    finish(workdir, shift, scale)
    assert cli.main(["convert", "--src", f"jax:{workdir}", "--dst", f"release:{tmp_path / 'vae.pt'}", "--quiet"]) == 0
    want = str(tmp_path / "export.safetensors")
    trainer.export(want, shift, scale)
    want_t, got = load_file(want), torch.load(tmp_path / "vae.pt", weights_only=True)
    assert set(got) == set(want_t) and all(np.array_equal(got[k].numpy(), want_t[k]) for k in want_t)
    assert json.loads(load_file_metadata(want)["mugv_vae_config"]) == vae_cfg.to_dict()
    assert vck.load(str(tmp_path / "vae.pt"), vae_cfg) is not None


def load_file_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        return f.metadata()
