"""Strict loading of release checkpoints into the Megatron MUG-DiT."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mugv.config import get_config
from mugv_megatron.model import build as dit
from mugv_megatron.model.dit import MUGDiT
from mugv_megatron.model.spec import get_local_layer_spec
from mugv_megatron.model.transformer_config import make_transformer_config

GOLDEN = Path(__file__).parent.parent / "golden" / "dit_tiny"
WEIGHTS = GOLDEN / "weights.safetensors"


@pytest.fixture(scope="module")
def release_state():
    return load_file(WEIGHTS)


def test_torch_pt_and_safetensors_load_the_same_weights(tmp_path, release_state):
    pt = tmp_path / "dit.pt"
    torch.save(release_state, pt)
    a = dit.load(pt, "tiny").state_dict()
    b = dit.load(WEIGHTS, "tiny").state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k


def test_renamed_tensor_is_named_in_the_error(tmp_path, release_state):
    state = dict(release_state)
    state["blocks.1.attn.qkv_renamed.weight"] = state.pop("blocks.1.attn.qkv.weight")
    path = tmp_path / "renamed.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        dit.load(path, "tiny")
    message = str(err.value)
    assert str(path) in message
    assert "missing tensors (1): blocks.1.attn.qkv.weight" in message
    assert "unexpected tensors (1): blocks.1.attn.qkv_renamed.weight" in message


def test_reshaped_tensor_is_named_in_the_error(tmp_path, release_state):
    state = dict(release_state)
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"][:-8].contiguous()
    path = tmp_path / "reshaped.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        dit.load(path, "tiny")
    message = str(err.value)
    assert str(path) in message
    assert "tensor blocks.0.mlp.fc1.weight: shape [568, 144] in checkpoint, model expects [576, 144]" in message


def test_non_tensor_entry_is_rejected(tmp_path, release_state):
    state = dict(release_state)
    state["note"] = "not a tensor"
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"entry 'note' is a str"):
        dit.load(path, "tiny")


def test_checkpoint_with_fewer_layers_than_the_config_fails(release_state):
    deeper = get_config("tiny", depth=3)
    with pytest.raises(ValueError, match=r"missing tensors \(21\): blocks\.2\.scale_shift_table"):
        dit.load(WEIGHTS, deeper)


def test_model_built_with_a_wrong_layer_count_fails_to_load(release_state):
    model = dit.build_model(get_config("tiny", depth=3), perform_initialization=False)
    assert len(model.decoder.layers) == 3
    with pytest.raises(ValueError, match=r"missing tensors \(21\): blocks\.2\."):
        dit.load_release_state(model, release_state, source="golden weights")
    shallow = dit.build_model(get_config("tiny", depth=1), perform_initialization=False)
    with pytest.raises(ValueError, match=r"unexpected tensors \(21\): blocks\.1\."):
        dit.load_release_state(shallow, release_state, source="golden weights")


def test_transformer_config_and_dit_config_must_agree_on_depth():
    tiny = get_config("tiny")
    tc = make_transformer_config(get_config("tiny", depth=3))
    with pytest.raises(ValueError, match="transformer config has 3 layers, DiTConfig.depth is 2"):
        MUGDiT(tiny, tc, get_local_layer_spec())


def test_megatron_parameter_names_follow_the_reference_map():
    model = dit.build_model("tiny", perform_initialization=False)
    names = {k for k in model.state_dict() if not k.endswith("._extra_state")}
    from mugv.layouts.megatron import megatron_schema

    assert names == set(megatron_schema(get_config("tiny")))
