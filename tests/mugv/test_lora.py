"""The one LoRA definition (mugv/lora.py) and its run-config sections: off by default, errors that
name the flag, adapter shapes that fit the release's linears, a deterministic B = 0 start."""

import numpy as np
import pytest

from mugv import lora
from mugv.config import get_config
from mugv.run.config import ConfigError, RunConfig, as_run_config
from mugv.schema import release_schema

CFG = get_config("tiny")


def test_off_by_default_and_settable_like_any_section():
    run = RunConfig()
    assert not run.lora.on and run.freeze.modules == ()
    assert lora.adapter_schema(CFG, run.lora) == {} and lora.init_adapters(CFG, run.lora) == {}
    assert not lora.is_frozen("blocks.0.attn.qkv.weight", run.lora, run.freeze)
    on = as_run_config({"lora": {"rank": 4, "alpha": 8.0, "targets": ["linear_qkv", "linear_fc2"]}})
    assert on.lora.on and on.lora.scale == 2.0 and on.lora.targets == ("linear_qkv", "linear_fc2")
    assert as_run_config(on.to_config_dict()) == on and as_run_config(on.to_dict()) == on


@pytest.mark.parametrize(
    "section, flag",
    [
        ({"lora": {"rank": -1}}, "--config.lora.rank"),
        ({"lora": {"rank": 4, "targets": ["linear_qkv", "to_q"]}}, "--config.lora.targets"),
        ({"lora": {"rank": 4, "dropout": 0.1}}, "--config.lora.dropout"),
        ({"lora": {"rank": 4, "alpha": 0.0}}, "--config.lora.alpha"),
        ({"lora": {"rank": 4, "base_dtype": "float16"}}, "--config.lora.base_dtype"),
        ({"lora": {"base_dtype": "bfloat16"}}, "--config.lora.base_dtype"),
        ({"freeze": {"modules": ["caption_embedder"]}}, "--config.freeze.modules"),
    ],
)
def test_errors_name_the_flag(section, flag):
    with pytest.raises((ConfigError, ValueError), match=flag):
        as_run_config(section)


def test_adapters_fit_the_release_linears_and_start_at_zero_update():
    spec = lora.LoraConfig(rank=3, alpha=6.0, init_seed=7)
    schema, base = lora.adapter_schema(CFG, spec), release_schema(CFG)
    # Every target's sites, on every block: linear_proj is both the self- and cross-attention proj.
    assert len(schema) == 2 * 7 * CFG.depth
    for name, shape in schema.items():
        site = name.rsplit(".lora_", 1)[0]
        out, inp = base[site + ".weight"]
        assert shape == ((3, inp) if ".lora_A." in name else (out, 3)), name
    init = lora.init_adapters(CFG, spec)
    assert {k: v.shape for k, v in init.items()} == schema
    assert all(v.dtype == np.float32 for v in init.values())
    a = init["blocks.1.mlp.fc1.lora_A.weight"]
    assert not np.any(init["blocks.1.mlp.fc1.lora_B.weight"])
    assert abs(float(a.std()) - 1 / 3) < 0.05  # PEFT's gaussian: std 1/rank
    # Deterministic in init_seed, different per block and per site.
    again = lora.init_adapters(CFG, spec)
    assert all(np.array_equal(init[k], again[k]) for k in init)
    assert not np.array_equal(a, init["blocks.0.mlp.fc1.lora_A.weight"][:, : a.shape[1]])
    assert not np.array_equal(init["blocks.0.attn.proj.lora_A.weight"], init["blocks.0.cross_attn.proj.lora_A.weight"])
    other = lora.init_adapters(CFG, lora.LoraConfig(rank=3, init_seed=8))
    assert not np.array_equal(a, other["blocks.1.mlp.fc1.lora_A.weight"])


def test_what_is_frozen():
    on, off = lora.LoraConfig(rank=2), lora.LoraConfig()
    caption = lora.FreezeConfig(modules=("y_embedder",))
    assert lora.is_frozen("t_block.1.weight", on, lora.FreezeConfig())
    assert lora.is_frozen("y_embedder.y_proj.fc1.weight", off, caption)
    assert not lora.is_frozen("blocks.0.mlp.fc1.weight", off, caption)


def test_adapters_round_trip_jax_megatron_jax_bit_exact_over_tp_shards():
    # Layout level (what the converters will run): release-named adapters → JAX layout → release
    # → Megatron (fused rows regrouped per head), cut into TP=2 shards by the reference's split
    # rule, merged → release → JAX: every bit back.
    from mugv.layouts import jax as jax_layout
    from mugv.layouts import megatron as mlayout

    spec = lora.LoraConfig(rank=3, alpha=3.0, init_seed=1)
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in lora.init_adapters(CFG, spec).items()}
    rules = {}
    for name, value in start.items():
        path, layer, j = jax_layout.adapter_to_jax(name, value, CFG)
        back_name, rel = jax_layout.adapter_to_release(path, j, layer)
        assert back_name == name
        (mname, full), *rest = mlayout.release_to_megatron(name, rel, CFG)
        assert not rest and mname.endswith(name[name.index(".lora_") :])
        shards = [mlayout.tp_shard(mname, full, r, 2) for r in range(2)]
        rules[mlayout.tp_split_rule(mname)] = rules.get(mlayout.tp_split_rule(mname), 0) + 1
        merged = mlayout.tp_merge(mname, shards, np.concatenate)
        (rname, rel2), *_ = mlayout.megatron_to_release(mname, merged, CFG)
        path2, layer2, j2 = jax_layout.adapter_to_jax(rname, rel2, CFG)
        assert (rname, path2, layer2) == (name, path, layer) and np.array_equal(j2, j)
    # Column bases: whole A, split B; row bases: split A, whole B (4 column + 3 row sites a block).
    assert rules == {"replicated": 7 * CFG.depth, "column": 4 * CFG.depth, "row": 3 * CFG.depth}
    qkv_b = mlayout.release_to_megatron(
        "blocks.0.attn.qkv.lora_B.weight", start["blocks.0.attn.qkv.lora_B.weight"], CFG
    )
    assert not np.array_equal(qkv_b[0][1], start["blocks.0.attn.qkv.lora_B.weight"])  # regrouped per head


def test_a_resume_with_other_adapters_or_frozen_modules_is_refused_naming_both():
    from mugv.io.mismatch import IncompatibleCheckpoint, check_lora

    run = as_run_config({"lora": {"rank": 4, "alpha": 8.0, "init_from": "peft_dir"}}).to_dict()
    same = lora.LoraConfig(rank=4, alpha=8.0, init_seed=7)  # init_seed / init_from only pick a start
    check_lora("ckpt", run, same, lora.FreezeConfig())
    check_lora("ckpt", {"model": {}}, lora.LoraConfig(), lora.FreezeConfig())  # no LoRA fields: no LoRA
    for other, freeze, shown in [
        (lora.LoraConfig(rank=2, alpha=8.0), lora.FreezeConfig(), "'rank': 4.*'rank': 2"),
        (lora.LoraConfig(rank=4, alpha=4.0), lora.FreezeConfig(), "'alpha': 8.0.*'alpha': 4.0"),
        (
            lora.LoraConfig(rank=4, alpha=8.0, base_dtype="bfloat16"),
            lora.FreezeConfig(),
            "'base_dtype': 'float32'.*'base_dtype': 'bfloat16'",
        ),
        (lora.LoraConfig(), lora.FreezeConfig(), "lora: .*'rank': 4.*None"),
        (same, lora.FreezeConfig(("y_embedder",)), r"freeze: checkpoint \[\], run \['y_embedder'\]"),
    ]:
        with pytest.raises(IncompatibleCheckpoint, match=shown) as e:
            check_lora("ckpt", run, other, freeze)
        assert "ckpt" in str(e.value) and "--config.lora" in str(e.value)
