"""VAEConfig presets, the release tensor schema, latent geometry and the encode/decode plans."""

import json
import os

import pytest
from safetensors import safe_open

from mugv.vae_config import (
    BUFFER_NAMES,
    UNUSED_IN_FORWARD,
    VAE_PRESETS,
    VAEConfig,
    get_vae_config,
    latent_size,
    release_vae_schema,
    schema_num_params,
)
from mugv_jax.vae.windows import ZERO, decode_windows, encode_calls
from tests.helpers import GOLDEN

RELEASE_SCHEMA = os.path.join(GOLDEN, "release_vae_schema.json")
TINY_DIR = os.path.join(GOLDEN, "vae_tiny")


def _release_json():
    with open(RELEASE_SCHEMA) as f:
        return json.load(f)


def _tiny_json():
    with open(os.path.join(TINY_DIR, "config.json")) as f:
        return json.load(f)


def test_release_schema_equals_the_release_file():
    ref = _release_json()
    schema = release_vae_schema(VAE_PRESETS["release"])
    expected = {k: tuple(v) for k, v in ref["tensors"].items()}
    assert schema == expected
    assert list(schema) == list(expected), "release order"
    assert len(schema) == ref["num_tensors"] == 522
    assert schema_num_params(schema) == ref["num_params"] == 411_752_900
    assert sum(s[1] for k, s in schema.items() if k in BUFFER_NAMES) == ref["num_buffer_elements"] == 48
    spatial = sum(n for k, n in _counts(schema).items() if k.startswith("spatial_vae."))
    temporal = sum(n for k, n in _counts(schema).items() if k.startswith("temporal_vae."))
    assert (spatial, temporal) == (ref["num_params_spatial_vae"], ref["num_params_temporal_vae"])
    unused = sum(n for k, n in _counts(schema).items() if k.startswith(UNUSED_IN_FORWARD))
    assert unused == ref["num_params_unused_in_forward"]
    assert sorted(UNUSED_IN_FORWARD) == sorted(ref["unused_in_forward"])


def _counts(schema):
    import math

    return {k: math.prod(s) for k, s in schema.items()}


def test_tiny_schema_equals_the_golden_weights_file():
    with safe_open(os.path.join(TINY_DIR, "weights.safetensors"), "np") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    schema = release_vae_schema(VAE_PRESETS["tiny"])
    assert schema == found
    assert len(schema) == 342


def test_presets_match_the_reference_constructor_arguments():
    tiny_ref = _tiny_json()
    for cfg, spatial, temporal in (
        (VAE_PRESETS["tiny"], tiny_ref["spatial_vae"]["AutoencoderKL_kwargs"], tiny_ref["temporal_vae"]["kwargs"]),
        (VAE_PRESETS["release"], tiny_ref["release"]["AutoencoderKL_kwargs"], tiny_ref["release"]["temporal_kwargs"]),
    ):
        assert list(cfg.block_out_channels) == spatial["block_out_channels"]
        assert (cfg.layers_per_block, cfg.latent_channels, cfg.norm_num_groups) == (
            spatial["layers_per_block"],
            spatial["latent_channels"],
            spatial["norm_num_groups"],
        )
        assert (cfg.in_channels, cfg.out_channels) == (spatial["in_channels"], spatial["out_channels"])
        assert (
            cfg.temporal_in_out_channels,
            cfg.latent_embed_dim,
            cfg.embed_dim,
            cfg.filters,
            cfg.num_res_blocks,
            cfg.temporal_num_groups,
        ) == (
            temporal["in_out_channels"],
            temporal["latent_embed_dim"],
            temporal["embed_dim"],
            temporal["filters"],
            temporal["num_res_blocks"],
            temporal["num_groups"],
        )
        assert list(cfg.channel_multipliers) == temporal["channel_multipliers"]
        assert list(cfg.temporal_downsample) == temporal["temporal_downsample"]
        assert cfg.scaling_factor == 0.18215
    release = tiny_ref["release"]["pipeline"]
    assert (VAE_PRESETS["release"].micro_frame_size, VAE_PRESETS["release"].micro_batch_size) == (
        release["micro_frame_size"],
        release["micro_batch_size"],
    )
    micro = tiny_ref["pipeline"]["variants"]["micro16"]
    assert (VAE_PRESETS["tiny"].micro_frame_size, VAE_PRESETS["tiny"].micro_batch_size) == (
        micro["micro_frame_size"],
        micro["micro_batch_size"],
    )
    assert VAE_PRESETS["release"].micro_latent_frames == 6


def test_config_round_trips_through_a_dict():
    cfg = VAE_PRESETS["tiny"]
    assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown VAEConfig fields"):
        VAEConfig.from_dict({**cfg.to_dict(), "nope": 1})


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(micro_frame_size=12), "multiple of 8"),
        (dict(temporal_in_out_channels=256), "must equal the 2D feature width"),
        (dict(temporal_downsample=(True, False, True)), "temporal_downsample"),
        (dict(norm_num_groups=48), "not divisible by norm_num_groups"),
        (dict(micro_batch_size=0), "micro_batch_size"),
    ],
)
def test_config_rejects_inconsistent_values(bad, match):
    with pytest.raises(ValueError, match=match):
        get_vae_config("release", **bad)


def _golden_cases():
    ref = _tiny_json()
    variants = ref["pipeline"]["variants"]
    for case, spec in ref["cases"].items():
        for mode, m in spec["modes"].items():
            yield case, spec, mode, m, variants[mode]["micro_frame_size"]


@pytest.mark.parametrize(
    "case, spec, mode, m, micro", list(_golden_cases()), ids=[f"{c}-{m}" for c, _, m, _, _ in _golden_cases()]
)
def test_plans_match_the_golden_run(case, spec, mode, m, micro):
    cfg = VAE_PRESETS["tiny"].replace(micro_frame_size=micro, micro_batch_size=None)
    assert list(latent_size(cfg, spec["T"], spec["H"], spec["W"])) == m["get_latent_size"]
    if "encoder_groups" in m:
        calls = encode_calls(spec["T"], micro)
        assert [g for call in calls for g in call] == m["encoder_groups"]
        # Frames a call receives before its front zero-padding, as recorded from the run.
        assert [sum(s != ZERO for g in call for s in g) for call in calls] == [c[2] for c in m["temporal_encode_calls"]]
        assert len(m["encoder_groups"]) == m["latent_frames"]
    latents = m.get("latent_frames", m.get("latent_frames_total"))
    num_frames = m.get("decode_num_frames", spec["T"])
    if case == "i2v":
        latents -= 1  # the release decodes z[:, :, 1:]
    windows = decode_windows(latents, num_frames, micro)
    out = 0
    assert len(windows) == len(m["decode_windows"])
    for win, ref in zip(windows, m["decode_windows"]):
        assert [win.latent_start, win.latent_stop] == ref["latents"]
        assert (win.num_frames, win.crop_front) == (ref["num_frames"], ref["crop_front"])
        kept = 8 * (win.latent_stop - win.latent_start) - win.crop_front
        assert kept == ref["decoded_frames"] - ref["crop_front"]
        assert [out, out + kept] == ref["output_frames"]
        out += kept


def test_release_latent_sizes():
    release = VAE_PRESETS["release"]
    assert latent_size(release, 105, 1280, 720) == (14, 160, 90)
    assert latent_size(release, 73, 1280, 720) == (10, 160, 90)
    assert latent_size(release, 8, 1110, 1108) == (1, 138, 138)
    # 105 frames: 7 copies of frame 0 first, then chunks of 48, 48, 16.
    calls = encode_calls(105, 48)
    assert [len(c) for c in calls] == [6, 6, 2]
    assert calls[0][0] == [0] * 8
    windows = decode_windows(13, 104, 48)
    assert [(w.latent_start, w.latent_stop, w.num_frames, w.crop_front) for w in windows] == [
        (0, 6, 48, 0),
        (6, 12, 48, 0),
        (12, 13, 8, 0),
    ]


def test_decode_windows_reject_too_few_frames():
    with pytest.raises(ValueError, match="num_frames=16"):
        decode_windows(3, 16, 16)


def test_vae_config_imports_without_jax_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, mugv.vae_config; "
        "bad = [m for m in ('jax', 'torch', 'flax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
