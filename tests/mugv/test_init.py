"""mugv.init: a fresh run's weights, the same for both trainers (tests/cross_backend/test_cli_parity.py
runs both commands from them)."""

import math

import numpy as np
import pytest

from mugv.config import get_config
from mugv.init import INIT_STD, InitialWeights, initial_tensor
from mugv.schema import release_schema

TINY = get_config("tiny")


def test_every_release_tensor_is_drawn_in_its_shape_and_float32():
    fresh = InitialWeights(TINY, seed=3)
    schema = release_schema(TINY)
    assert list(fresh) == list(schema) and len(fresh) == len(schema)
    for name, shape in schema.items():
        a = fresh[name]
        assert a.shape == shape and a.dtype == np.float32, name


def test_each_tensor_depends_only_on_the_seed_and_its_name():
    a, b = InitialWeights(TINY, seed=3), InitialWeights(TINY, seed=4)
    name = "blocks.1.mlp.fc1.weight"
    # Drawn alone (a pipeline stage's subset) or after every other tensor: the same bits.
    alone = initial_tensor(TINY, name, 3)
    dict(a)
    assert np.array_equal(alone, a[name])
    assert not np.array_equal(a[name], b[name])
    assert not np.array_equal(a["blocks.0.mlp.fc1.weight"], a[name])


def test_the_reference_distributions():
    fresh = InitialWeights(TINY, seed=0)
    out_std = INIT_STD / math.sqrt(2 * TINY.depth)
    for name, std in (
        ("blocks.0.mlp.fc1.weight", INIT_STD),
        ("blocks.1.attn.qkv.weight", INIT_STD),
        ("blocks.0.cross_attn.kv_linear.weight", INIT_STD),
        ("blocks.0.mlp.fc2.weight", out_std),
        ("blocks.1.attn.proj.weight", out_std),
        ("blocks.0.scale_shift_table", 1 / math.sqrt(TINY.hidden_size)),
    ):
        # Bounds of 4 standard errors of the sample std (1/√(2n)) and mean (std/√n).
        a = fresh[name]
        assert abs(a.std() / std - 1) < 4 / math.sqrt(2 * a.size), name
        assert abs(a.mean()) < 4 * std / math.sqrt(a.size), name
    for name in ("blocks.0.attn.qkv.bias", "blocks.0.mlp.fc2.bias", "blocks.1.cross_attn_norm.bias"):
        assert not fresh[name].any(), name
    for name in ("blocks.0.attn.q_norm.weight", "blocks.1.cross_attn.k_norm.weight", "blocks.0.cross_attn_norm.weight"):
        assert (fresh[name] == 1).all(), name
    # PyTorch's default for the other linears and the patch conv: U(±1/√fan_in), bias too.
    for name, fan_in in (
        ("t_block.1.weight", TINY.hidden_size),
        ("t_block.1.bias", TINY.hidden_size),
        ("y_embedder.y_proj.fc1.weight", TINY.text_dim),
        ("x_embedder.proj.weight", TINY.in_channels * TINY.patch_volume),
        ("t_embedder.mlp.0.bias", TINY.frequency_dim),
    ):
        a, bound = fresh[name], 1 / math.sqrt(fan_in)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound, name
    assert abs(fresh["start_token"].std() / 0.02 - 1) < 0.25  # 144 samples


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="y_embedder.y_embedding"):
        initial_tensor(TINY, "y_embedder.y_embedding", 0)
