"""Framework-free model description: presets, geometry and the canonical parameter schema."""

import json
import os
import subprocess
import sys

import pytest

from mugv import geometry
from mugv.config import PRESETS, DiTConfig, get_config
from mugv.schema import check_state_dict_shapes, num_params, release_schema
from tests.helpers import GOLDEN


def test_core_imports_without_jax_or_torch():
    code = (
        "import sys, mugv, mugv.geometry, mugv.flops, mugv.training, mugv.schema, mugv.layouts.jax, "
        "mugv.layouts.megatron, mugv.io.base, mugv.io.release, mugv.io.torchzip, mugv.io.orbax, "
        "mugv.io.torch_dist, mugv.io.torch_cpu, mugv.io.weights, mugv.io.spec, mugv.io.megatron, "
        "mugv.io.atomic, mugv.io.staging, mugv.io.null_text, mugv.lora, mugv.io.peft; "
        "bad = [m for m in ('jax', 'torch', 'flax', 'orbax', 'tensorstore', 'megatron') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(GOLDEN) + "/..")


def test_10b_schema_equals_release_schema_exactly():
    with open(os.path.join(GOLDEN, "release_schema_10b.json")) as f:
        ref = json.load(f)
    schema = release_schema(PRESETS["10b"])
    assert list(schema) == list(ref["tensors"])  # same names, same order
    assert {k: list(v) for k, v in schema.items()} == ref["tensors"]
    assert len(schema) == ref["num_tensors"] == 1197
    assert num_params(schema) == ref["num_params"] == 10_830_321_984
    cfg = PRESETS["10b"]
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (56, 3456, 48, 72)
    assert (cfg.patch_size, cfg.in_channels, cfg.out_channels, cfg.text_dim, cfg.mlp_hidden_size) == (
        (1, 2, 2),
        24,
        48,
        4096,
        13824,
    )


@pytest.mark.parametrize(
    "name,params",
    [
        ("1b", 1_208_059_968),
        ("4b", 4_818_161_856),
        ("10b", 10_830_321_984),
        ("18b", 19_244_540_352),
        ("debug", 76_834_272),
    ],
)
def test_preset_parameter_counts_match_spec(name, params):
    # docs/reference.md §1.1 size table.
    assert num_params(release_schema(PRESETS[name])) == params


def test_tiny_schema_matches_golden_weights():
    from tests.helpers import dit_weights

    w = dit_weights()
    assert {k: tuple(v.shape) for k, v in w.items()} == release_schema(PRESETS["tiny"])


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="divisible by 6"):
        DiTConfig(hidden_size=128, num_heads=2)  # head dim 64
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("11b")
    cfg = get_config("10b", caption_norm_eps=1e-5)
    assert cfg.caption_norm_eps == 1e-5 and PRESETS["10b"].caption_norm_eps == 1e-6
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        DiTConfig.from_dict({"hidden": 3})


def test_latent_geometry_release_cases():
    # Release chunking (micro 48): 105 → 14 and 73 → 10 latent frames (docs/reference.md §6.4).
    assert geometry.latent_frames(105, 48) == 14
    assert geometry.latent_frames(73, 48) == 10
    assert geometry.latent_frames(17) == 3 and geometry.latent_frames(17, 16) == 3
    assert geometry.latent_frames(20, 16) == 3 and geometry.latent_frames(1) == 1
    # 1110 px rounds down through three stride-2 stages: 138, so decoding gives 1104.
    assert geometry.latent_spatial(832, 1110) == (104, 138)
    cfg = PRESETS["10b"]
    latent = geometry.latent_shape(105, 1280, 720, 48)
    assert latent == (14, 160, 90)
    assert geometry.num_video_tokens(latent, cfg) == 50_400
    assert geometry.tokens_for_clip(105, 1280, 720, cfg, 48) == 50_402
    assert geometry.tokens_for_clip(73, 1280, 720, cfg, 48) == 36_002
    # Odd latent sizes are zero-padded to the patch: 7 → 4 patch rows.
    assert geometry.patch_grid((4, 7, 10), PRESETS["tiny"]) == (4, 4, 5)
    with pytest.raises(ValueError, match="multiple of 8"):
        geometry.latent_frames(33, 20)


def test_strict_shape_check_names_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    found = {"a": (3, 2), "b": (4,), "z": (1,)}
    with pytest.raises(ValueError) as e:
        check_state_dict_shapes(found, expected, "ckpt.pt")
    msg = str(e.value)
    assert "ckpt.pt" in msg and "missing tensors (1): c" in msg and "unexpected tensors (1): z" in msg
    assert "tensor a: shape [3, 2] in checkpoint, model expects [2, 3]" in msg
    check_state_dict_shapes(expected, expected, "ok")


def _imports(package: str) -> dict[str, set[str]]:
    """{file: top-level modules it imports}, lazy imports inside functions included."""
    import ast

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(GOLDEN))), package)
    assert os.path.isfile(os.path.join(root, "__init__.py")), root
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                mods = set()
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        mods |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        mods.add(node.module.split(".")[0])
                out[os.path.relpath(path, os.path.dirname(root))] = mods
    return out
