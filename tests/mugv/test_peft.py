"""Adapters in PEFT's format (mugv/io/peft.py): `peft` loads our export onto a torch module with
the release's module names (built from the release schema, tests/golden/dit_tiny weights) and its
adapted linears compute base + scale·B·A like the definition; PEFT's merge equals ours
(mugv.lora.merge_release); the directory reads back exactly; mismatches are refused."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mugv.config import get_config
from mugv.io import peft as peft_io
from mugv.lora import LoraConfig, init_adapters, merge_release
from mugv.schema import release_schema

GOLDEN = Path(__file__).parent.parent / "golden" / "dit_tiny" / "weights.safetensors"
CFG = get_config("tiny")
LORA = LoraConfig(rank=4, alpha=8.0, targets=("linear_qkv", "linear_proj", "linear_fc2"), init_seed=5)
# torch and numpy sum the [out, r]·[r, in] products in their own orders: float32 rounding only.
RTOL = 1e-6
# A float32 layer output against a float64 reference, relative to its largest entry (sums of up
# to a few hundred float32 products).
OUT_REL = 1e-6


def _trained():
    rng = np.random.default_rng(2)
    return {
        k: (rng.standard_normal(v.shape).astype(np.float32) * 0.1 if ".lora_B." in k else v)
        for k, v in init_adapters(CFG, LORA).items()
    }


def release_torch_model(config, state):
    """A torch module tree with the release's names; a module holding exactly a 2-D weight and
    its bias is an nn.Linear (what PEFT adapts)."""
    schema = release_schema(config)
    root = torch.nn.Module()
    modules = {}
    for name in schema:
        stem, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        modules.setdefault(stem, {})[leaf] = schema[name]
    for stem, leaves in modules.items():
        node = root
        parts = stem.split(".") if stem else []
        for i, part in enumerate(parts):
            if not hasattr(node, part):
                is_leaf = i == len(parts) - 1
                linear = is_leaf and set(leaves) == {"weight", "bias"} and len(leaves["weight"]) == 2
                out_f, in_f = leaves["weight"] if linear else (0, 0)
                node.add_module(part, torch.nn.Linear(in_f, out_f) if linear else torch.nn.Module())
            node = getattr(node, part)
        for leaf, shape in leaves.items():
            if not isinstance(node, torch.nn.Linear):
                node.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape)))
    root.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("peft") / "adapter")
    return peft_io.write(path, _trained(), LORA, CFG)


def test_peft_loads_the_export_and_computes_base_plus_adapter(exported):
    from peft import PeftModel

    base = load_file(GOLDEN)
    model = PeftModel.from_pretrained(release_torch_model(CFG, base), exported)
    adapters, s = _trained(), LORA.scale
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, CFG.mlp_hidden_size)).astype(np.float32))
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if f"{name}.lora_A.weight" not in adapters:
            assert not hasattr(module, "lora_A"), name  # PEFT adapted only our targets
            continue
        w, b = base[f"{name}.weight"], base[f"{name}.bias"]
        a, bb = adapters[f"{name}.lora_A.weight"], adapters[f"{name}.lora_B.weight"]
        xi = x[:, : w.shape[1]]
        with torch.no_grad():
            got = module(xi).numpy()
        x64 = xi.numpy().astype(np.float64)
        want = x64 @ w.T + b + s * (x64 @ a.T) @ bb.T  # float64 reference
        assert np.abs(got - want).max() <= OUT_REL * np.abs(want).max(), name
        checked += 1
    assert checked == CFG.depth * 4  # qkv, both projs, fc2 per block
    # PEFT's merge equals ours, tensor by tensor.
    merged = model.merge_and_unload().state_dict()
    ours = dict(merge_release(base.items(), adapters, LORA))
    assert merged.keys() == ours.keys()
    for k, v in ours.items():
        np.testing.assert_allclose(merged[k].numpy(), v, rtol=RTOL, atol=RTOL)
    assert not np.array_equal(ours["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])


def test_the_export_reads_back_exactly_and_mismatches_are_refused(exported, tmp_path):
    lora, adapters = peft_io.read(exported, CFG)
    assert lora == LORA
    trained = _trained()
    assert adapters.keys() == trained.keys() and all(np.array_equal(adapters[k], trained[k]) for k in trained)
    with open(f"{exported}/adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["target_modules"] == ["attn.qkv", "attn.proj", "cross_attn.proj", "mlp.fc2"] and cfg["r"] == 4
    with pytest.raises(FileExistsError):
        peft_io.write(exported, trained, LORA, CFG)
    with pytest.raises(ValueError, match="missing"):
        peft_io.write(str(tmp_path / "x"), {k: v for k, v in trained.items() if "blocks.1." not in k}, LORA, CFG)
    with pytest.raises(ValueError, match="do not match"):
        peft_io.read(exported, get_config("tiny", depth=CFG.depth + 1))


def test_read_for_takes_the_adapter_whatever_the_base_dtype(exported):
    """`config.lora.init_from`: the adapter must match the run's rank, alpha and targets; how the
    run stores its frozen base (base_dtype) is the run's, not the adapter's."""
    trained = _trained()
    for base_dtype in ("float32", "bfloat16"):
        run = dataclasses.replace(LORA, init_from=exported, base_dtype=base_dtype)
        got = peft_io.read_for(run, CFG)
        assert got.keys() == trained.keys() and all(np.array_equal(got[k], trained[k]) for k in trained)
    with pytest.raises(ValueError, match=r"rank-4 adapter .* --config.lora is rank 8"):
        peft_io.read_for(dataclasses.replace(LORA, init_from=exported, rank=8), CFG)
