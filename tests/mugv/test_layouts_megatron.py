"""The release ↔ Megatron name map (mugv/layouts/megatron.py) on the golden weights."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mugv.config import get_config
from mugv.layouts import megatron as layout
from mugv.schema import release_schema

GOLDEN = Path(__file__).parent.parent / "golden" / "dit_tiny"
CONFIG = get_config("tiny")


@pytest.fixture(scope="module")
def release_weights():
    return load_file(GOLDEN / "weights.safetensors")


def test_round_trip_is_bit_exact(release_weights):
    megatron = layout.release_state_to_megatron(release_weights, CONFIG)
    back = layout.megatron_state_to_release(megatron, CONFIG)
    assert list(back) == list(release_weights)
    for name, array in release_weights.items():
        assert back[name].dtype == array.dtype, name
        assert np.array_equal(back[name], array), name


def test_megatron_names_and_shapes_cover_the_schema(release_weights):
    megatron = layout.release_state_to_megatron(release_weights, CONFIG)
    assert {k: v.shape for k, v in megatron.items()} == layout.megatron_schema(CONFIG)
    assert len(megatron) == len(release_schema(CONFIG))
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in megatron
    assert "final_layer.scale_shift_table.bias" in megatron
    assert "decoder.layers.0.scale_shift_table.bias" in megatron


@pytest.mark.parametrize("release_suffix, fused", [("attn.qkv", 3), ("cross_attn.kv_linear", 2)])
def test_per_head_regrouping_follows_the_row_formula(release_weights, release_suffix, fused):
    """Megatron row h·(n·d) + j·d + c = release row j·(H·d) + h·d + c (docs/reference.md §4.6)."""
    heads, d = CONFIG.num_heads, CONFIG.head_dim
    for kind in ("weight", "bias"):
        name = f"blocks.0.{release_suffix}.{kind}"
        release = release_weights[name]
        [(_, grouped)] = layout.release_to_megatron(name, release, CONFIG)
        for h in range(heads):
            for j in range(fused):
                for c in (0, d // 2, d - 1):
                    assert np.array_equal(grouped[h * fused * d + j * d + c], release[j * heads * d + h * d + c])


def test_tensor_parallel_shards_hold_whole_heads(release_weights):
    tp, d = 2, CONFIG.head_dim
    name = "blocks.1.attn.qkv.weight"
    [(mname, full)] = layout.release_to_megatron(name, release_weights[name], CONFIG)
    assert layout.tp_split_rule(mname) == "column"
    c = CONFIG.hidden_size
    for rank in range(tp):
        shard = layout.tp_shard(mname, full, rank, tp)
        # One head per rank in the tiny config: its q, k and v rows, in that order.
        q, k, v = (release_weights[name][j * c + rank * d : j * c + (rank + 1) * d] for j in range(3))
        assert np.array_equal(shard, np.concatenate([q, k, v]))


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_shard_and_merge_round_trip(release_weights, tp):
    megatron = layout.release_state_to_megatron(release_weights, CONFIG)
    rules = set()
    for name, full in megatron.items():
        shards = [layout.tp_shard(name, full, r, tp) for r in range(tp)]
        rule = layout.tp_split_rule(name)
        rules.add(rule)
        if rule == "row":
            assert shards[0].shape == (full.shape[0], full.shape[1] // tp)
        elif rule == "column":
            assert shards[0].shape == (full.shape[0] // tp, *full.shape[1:])
        merged = layout.tp_merge(name, shards, np.concatenate)
        assert np.array_equal(merged, full), name
    assert rules == {"row", "column", "replicated"}


def test_tp_split_rules_match_the_reference_table():
    p = "decoder.layers.3."
    column = [
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "cross_attention.linear_q.weight",
        "cross_attention.linear_kv.bias",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc1.bias",
    ]
    row = ["self_attention.linear_proj.weight", "cross_attention.linear_proj.weight", "mlp.linear_fc2.weight"]
    replicated = [
        "self_attention.linear_proj.bias",
        "mlp.linear_fc2.bias",
        "scale_shift_table.bias",
        "self_attention.q_layernorm.weight",
        "pre_cross_attn_layernorm.weight",
    ]
    assert [layout.tp_split_rule(p + s) for s in column] == ["column"] * len(column)
    assert [layout.tp_split_rule(p + s) for s in row] == ["row"] * len(row)
    assert [layout.tp_split_rule(p + s) for s in replicated] == ["replicated"] * len(replicated)
    assert layout.tp_split_rule("timestep_block.1.weight") == "replicated"


def test_indivisible_split_names_the_tensor():
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.linear_fc1\.weight"):
        layout.tp_shard(name, np.zeros((5, 4)), 0, 2)


def test_unknown_names_are_rejected():
    with pytest.raises(KeyError, match="blocks.0.attn.nonsense"):
        layout.release_to_megatron("blocks.0.attn.nonsense", np.zeros(3), CONFIG)
    with pytest.raises(KeyError, match="decoder.layers.0.bogus"):
        layout.megatron_to_release("decoder.layers.0.bogus", np.zeros(3), CONFIG)
    assert layout.megatron_to_release("decoder.layers.0.mlp.linear_fc1._extra_state", None, CONFIG) == []


def test_renames_of_the_reference_converter():
    assert layout.megatron_name("t_embedder.mlp.0.weight") == "timestep_embedder.mlp.0.weight"
    assert layout.megatron_name("t_block.1.bias") == "timestep_block.1.bias"
    assert layout.megatron_name("y_embedder.y_proj.fc2.weight") == "context_embedder.proj.fc2.weight"
    assert layout.megatron_name("y_embedder.y_embedding") == "context_embedder.drop_emb"
    assert layout.megatron_name("blocks.7.cross_attn_norm.bias") == "decoder.layers.7.pre_cross_attn_layernorm.bias"
    assert layout.release_name("decoder.layers.7.scale_shift_table.bias") == "blocks.7.scale_shift_table"
