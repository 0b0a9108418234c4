"""Release layout ↔ VideoVAE: abstract init, strict loading, bit-exact export, logical axes."""

import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import mugv_jax.vae as vae
from mugv.vae_config import schema_num_params
from mugv_jax.vae.layers import Buffer
from tests.helpers import GOLDEN

WEIGHTS = os.path.join(GOLDEN, "vae_tiny", "weights.safetensors")
RELEASE_SCHEMA = os.path.join(GOLDEN, "release_vae_schema.json")


def test_abstract_release_model_exports_exactly_the_release_schema():
    with open(RELEASE_SCHEMA) as f:
        ref = json.load(f)
    abstract = nnx.eval_shape(lambda: vae.VideoVAE("release", rngs=nnx.Rngs(0)))
    state = vae.release_state(abstract)
    # Nothing was allocated: every value is a shape-only placeholder.
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in state.values())
    assert {k: list(v.shape) for k, v in state.items()} == ref["tensors"]
    assert list(state) == list(ref["tensors"])
    assert {v.dtype for v in state.values()} == {np.dtype(np.float32)}
    assert schema_num_params({k: v.shape for k, v in state.items()}) == ref["num_params"]


def test_every_variable_names_its_logical_axes():
    abstract = nnx.eval_shape(lambda: vae.VideoVAE("release", rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Any(nnx.Param, Buffer)))
    assert len(flat) == 522
    for path, var in flat:
        axes = var.get_metadata().get("logical_axes")
        assert isinstance(axes, tuple) and len(axes) == var.get_value().ndim, path
        name = ".".join(map(str, path))
        if name.endswith("conv.weight") or (var.get_value().ndim == 4 and name.endswith(".weight")):
            assert axes[:2] == ("conv_out", "conv_in") and set(axes[2:]) == {None}, name


def test_release_round_trip_is_bit_exact_safetensors():
    original = load_file(WEIGHTS)
    exported = vae.export_release_state_dict(vae.load(WEIGHTS, "tiny"))
    assert list(exported) == list(vae.release_vae_schema(vae.get_vae_config("tiny")))
    assert set(exported) == set(original)
    for name, value in original.items():
        assert exported[name].dtype == np.float32, name
        assert np.array_equal(exported[name], value), name


def test_release_round_trip_is_bit_exact_torch_pt(tmp_path):
    original = load_file(WEIGHTS)
    path = tmp_path / "vae.pt"
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, path)
    exported = vae.export_release_state_dict(vae.load(path, "tiny"))
    assert set(exported) == set(original)
    for name, value in original.items():
        assert np.array_equal(exported[name], value), name


def test_bfloat16_checkpoint_loads_as_float32_params(tmp_path):
    original = load_file(WEIGHTS)
    path = tmp_path / "vae_bf16.pt"
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in original.items()}, path)
    exported = vae.export_release_state_dict(vae.load(path, "tiny"))
    name = "temporal_vae.decoder.conv_out.conv.weight"
    expected = torch.from_numpy(original[name]).to(torch.bfloat16).to(torch.float32).numpy()
    assert exported[name].dtype == np.float32 and np.array_equal(exported[name], expected)


def _write_modified(tmp_path, fmt, edit):
    tensors = dict(load_file(WEIGHTS))
    edit(tensors)
    if fmt == "safetensors":
        path = tmp_path / "modified.safetensors"
        save_file(tensors, str(path))
    else:
        path = tmp_path / "modified.pt"
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_strict_load_names_a_renamed_tensor(tmp_path, fmt):
    name = "temporal_vae.decoder.upsample_block.norm2.bias"
    path = _write_modified(tmp_path, fmt, lambda t: t.update({name + "_renamed": t.pop(name)}))
    with pytest.raises(ValueError) as err:
        vae.load(path, "tiny")
    msg = str(err.value)
    assert re.search(rf"missing tensor '{re.escape(name)}'", msg)
    assert re.search(rf"unexpected tensor '{re.escape(name)}_renamed'", msg)
    assert path in msg


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_strict_load_names_a_reshaped_tensor_and_both_shapes(tmp_path, fmt):
    name = "spatial_vae.module.encoder.conv_in.weight"  # [8, 3, 3, 3]
    path = _write_modified(tmp_path, fmt, lambda t: t.update({name: t[name].reshape(4, 6, 3, 3)}))
    with pytest.raises(ValueError) as err:
        vae.load(path, "tiny")
    msg = str(err.value)
    assert name in msg and "(4, 6, 3, 3)" in msg and "(8, 3, 3, 3)" in msg and path in msg
    assert "1 problems" in msg


def test_strict_load_names_a_missing_tensor(tmp_path):
    path = _write_modified(tmp_path, "safetensors", lambda t: t.pop("logvar"))
    with pytest.raises(ValueError, match=r"missing tensor 'logvar' \(model expects shape \(\)\)"):
        vae.load(path, "tiny")


def test_loading_into_the_wrong_config_fails_loudly():
    with pytest.raises(ValueError, match="strict load of .*weights.safetensors failed"):
        vae.load(WEIGHTS, "release")
