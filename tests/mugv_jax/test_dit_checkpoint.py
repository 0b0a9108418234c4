"""Strict loading of release checkpoints (safetensors and torch .pt)."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import mugv_jax.dit as dit
from tests.helpers import case_inputs, dit_vectors, dit_weights, max_abs

GOLDEN_ATOL = 1e-4


def _save_pt(tensors, path, dtype=torch.float32):
    torch.save({k: torch.from_numpy(np.array(v)).to(dtype) for k, v in tensors.items()}, path)


def test_pt_and_safetensors_load_identically(tmp_path):
    pt = tmp_path / "dit.pt"
    _save_pt(dit_weights(), pt)
    m = dit.load(pt, "tiny")
    args, kwargs = case_inputs("i2v")
    assert max_abs(m(*args, **kwargs), dit_vectors()["i2v.out"]) <= GOLDEN_ATOL
    a = dit.export_release_state_dict(m)
    assert all(np.array_equal(a[k], v) for k, v in dit_weights().items())


def test_bf16_release_checkpoint_widens_exactly(tmp_path):
    pt = tmp_path / "dit_bf16.pt"
    _save_pt(dit_weights(), pt, torch.bfloat16)
    got = dit.export_release_state_dict(dit.load(pt, "tiny"))
    for k, v in dit_weights().items():
        want = torch.from_numpy(v).to(torch.bfloat16).to(torch.float32).numpy()
        assert np.array_equal(got[k], want), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_renamed_tensor_is_named_in_the_error(tmp_path, fmt):
    w = dict(dit_weights())
    w["blocks.1.attn.qkv.weights"] = w.pop("blocks.1.attn.qkv.weight")
    path = tmp_path / f"bad.{fmt}"
    save_file(w, str(path)) if fmt == "safetensors" else _save_pt(w, path)
    with pytest.raises(ValueError) as e:
        dit.load(path, "tiny")
    msg = str(e.value)
    assert str(path) in msg
    assert "missing tensors (1): blocks.1.attn.qkv.weight" in msg
    assert "unexpected tensors (1): blocks.1.attn.qkv.weights" in msg


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_reshaped_tensor_is_named_with_both_shapes(tmp_path, fmt):
    w = dict(dit_weights())
    w["blocks.0.mlp.fc1.weight"] = w["blocks.0.mlp.fc1.weight"][:500]
    path = tmp_path / f"bad.{fmt}"
    save_file(w, str(path)) if fmt == "safetensors" else _save_pt(w, path)
    with pytest.raises(
        ValueError,
        match=r"tensor blocks\.0\.mlp\.fc1\.weight: shape \[500, 144\] "
        r"in checkpoint, model expects \[576, 144\]",
    ):
        dit.load(path, "tiny")


def test_wrong_config_depth_fails_loudly():
    from tests.helpers import DIT_WEIGHTS

    with pytest.raises(ValueError, match=r"missing tensors \(21\): blocks\.2\."):
        dit.load(DIT_WEIGHTS, dit.model.DiTConfig(depth=3, hidden_size=144, num_heads=2, text_dim=64))


def test_not_a_state_dict_or_missing_file(tmp_path):
    bad = tmp_path / "nested.pt"
    torch.save({"model": {"a": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="not a flat"):
        dit.load(bad, "tiny")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        dit.load(tmp_path / "nope.pt", "tiny")


def test_save_atomic_keeps_scalars_and_transposed_views(tmp_path):
    """0-d tensors stay 0-d (the VAE's scalar `logvar` must load strictly) and a transposed view is
    written in its logical order, not its buffer's."""
    from safetensors.numpy import load_file

    from mugv.safetensors_io import save_atomic

    view = np.arange(6, dtype=np.float32).reshape(2, 3).T
    save_atomic({"logvar": np.zeros((), np.float32), "view": view}, tmp_path / "x.safetensors")
    got = load_file(str(tmp_path / "x.safetensors"))
    assert got["logvar"].shape == ()
    assert np.array_equal(got["view"], view)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
