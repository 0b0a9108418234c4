"""A → B → A is bit-exact for every pair of formats, on the golden tiny weights, in float32 and
bfloat16 (same dtype throughout)."""

import itertools

import ml_dtypes
import numpy as np
import pytest

from converters.convert import convert
from converters.loaders import release_state
from tests.helpers import DIT_WEIGHTS, dit_weights

# name → (spec template, tp, pp). Shards of 1 MB make the tiny model span several files.
FORMATS = {
    "safetensors": ("release:{d}/dit.safetensors", 1, 1),
    "pt": ("release:{d}/dit.pt", 1, 1),
    "sharded_st": ("release:{d}/st_shards", 1, 1),
    "sharded_bin": ("release:{d}/bin_shards/pytorch_model.bin.index.json", 1, 1),
    "torch_dist": ("megatron:{d}/torch_dist", 1, 1),
    "legacy_tp1": ("megatron-legacy:{d}/legacy_tp1", 1, 1),
    "legacy_tp2": ("megatron-legacy:{d}/legacy_tp2", 2, 1),
    "legacy_pp2": ("megatron-legacy:{d}/legacy_pp2", 1, 2),
    "legacy_tp2_pp2": ("megatron-legacy:{d}/legacy_tp2_pp2", 2, 2),
    "jax": ("jax:{d}/jax", 1, 1),
}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
SHARD = 1_000_000


def expected(dtype_name):
    return {k: v.astype(DTYPES[dtype_name]) for k, v in dit_weights().items()}


def spec_of(fmt, d):
    template, tp, pp = FORMATS[fmt]
    return template.format(d=d), tp, pp


def read_path(spec):
    # A sharded release named by its index json is read back from its folder.
    return spec.replace("/pytorch_model.bin.index.json", "")


def assert_bit_exact(spec, want):
    got = release_state(read_path(spec))
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, (spec, name, g.dtype, w.dtype)
        assert np.array_equal(g, w), (spec, name)


@pytest.fixture(scope="module", params=list(DTYPES))
def sources(request, tmp_path_factory):
    """The golden weights in every format, in one dtype."""
    dtype = request.param
    root = tmp_path_factory.mktemp(f"src_{dtype}")
    made = {}
    for fmt in FORMATS:
        spec, tp, pp = spec_of(fmt, root)
        convert(DIT_WEIGHTS, spec, dtype=dtype, tp=tp, pp=pp, max_shard_bytes=SHARD)
        made[fmt] = spec
    return dtype, made


def test_every_source_holds_the_golden_weights(sources):
    dtype, made = sources
    for spec in made.values():
        assert_bit_exact(spec, expected(dtype))


@pytest.mark.parametrize("a,b", list(itertools.combinations(FORMATS, 2)))
def test_a_to_b_to_a_is_bit_exact(sources, tmp_path, a, b):
    dtype, made = sources
    want = expected(dtype)
    b_spec, tp, pp = spec_of(b, tmp_path / "b")
    (tmp_path / "b").mkdir()
    convert(read_path(made[a]), b_spec, tp=tp, pp=pp, max_shard_bytes=SHARD)
    assert_bit_exact(b_spec, want)
    a_spec, tp, pp = spec_of(a, tmp_path / "a")
    (tmp_path / "a").mkdir()
    convert(read_path(b_spec), a_spec, tp=tp, pp=pp, max_shard_bytes=SHARD)
    assert_bit_exact(a_spec, want)
