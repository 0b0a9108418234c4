"""Parallel conversion (converters/pipeline.py): the same bytes as one tensor at a time, bounded
bytes in flight, and a failure on a worker thread leaves no output."""

import os
import threading
import time

import numpy as np
import pytest

from converters import pipeline
from converters.convert import convert, verify
from mugv.io.release import ReleaseReader, ReleaseWriter
from tests.helpers import DIT_WEIGHTS

OUTPUTS = ["release:{d}/o.pt", "release:{d}/o.safetensors", "megatron:{d}/o", "megatron-legacy:{d}/o", "jax:{d}/o"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A memory-mapped release source (writers keep views of it), a bf16 cast of it (writers
    stage copies) and both training formats (readers with their own jobs)."""
    d = tmp_path_factory.mktemp("src")
    convert(DIT_WEIGHTS, f"jax:{d}/jax", workers=1)
    convert(DIT_WEIGHTS, f"megatron:{d}/td", workers=1)
    return {"release": DIT_WEIGHTS, "jax": f"jax:{d}/jax", "torch_dist": f"megatron:{d}/td"}


def _bits_equal(a: str, b: str) -> bool:
    r = verify(a, b)
    assert r.compared == 63, r
    return r.equal


# Every output from the mapped release file (views kept), the staging path (a cast), and both
# training-format readers.
CASES = [("release", "keep", dst) for dst in OUTPUTS] + [
    ("release", "bfloat16", "megatron:{d}/o"),
    ("release", "bfloat16", "jax:{d}/o"),
    ("jax", "keep", "release:{d}/o.safetensors"),
    ("jax", "keep", "megatron:{d}/o"),
    ("torch_dist", "keep", "release:{d}/o.pt"),
    ("torch_dist", "keep", "jax:{d}/o"),
]


@pytest.mark.parametrize("src,dtype,dst", CASES)
def test_parallel_conversion_equals_serial_bit_exactly(sources, tmp_path, src, dtype, dst):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    serial.mkdir(), parallel.mkdir()
    convert(sources[src], dst.format(d=serial), dtype=dtype, workers=1)
    convert(sources[src], dst.format(d=parallel), dtype=dtype, workers=4)
    a, b = dst.format(d=serial), dst.format(d=parallel)
    assert _bits_equal(a, b)
    if dst.startswith("release:"):
        # A release file's layout depends only on the entries: the files are identical.
        assert (serial / os.path.basename(a)).read_bytes() == (parallel / os.path.basename(b)).read_bytes()
    if dtype == "keep":
        assert _bits_equal(DIT_WEIGHTS, b)


@pytest.mark.parametrize("dst", OUTPUTS)
def test_a_failure_on_a_worker_thread_leaves_no_output(tmp_path, monkeypatch, dst):
    from converters.formats import jax as jax_fmt
    from converters.formats import megatron

    writers = [ReleaseWriter, megatron.TorchDistWriter, megatron.LegacyWriter, jax_fmt.JaxWriter]
    calls = {"n": 0}
    lock = threading.Lock()
    originals = {cls: cls._write for cls in writers}

    def failing(self, name, array):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 30:
            assert threading.current_thread().name.startswith("mugv-convert")
            raise OSError("disk on fire")
        return originals[type(self)](self, name, array)

    for cls in writers:
        monkeypatch.setattr(cls, "_write", failing)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(OSError, match="disk on fire"):
        convert(DIT_WEIGHTS, dst.format(d=tmp_path), workers=4)
    assert os.listdir(tmp_path) == []
    assert calls["n"] < 63  # no tensor was started long after the failure
    left = {t.name for t in threading.enumerate()} - before
    assert not [n for n in left if n.startswith("mugv-convert")], left


def test_bytes_in_flight_are_capped_and_errors_stop_new_jobs():
    state = {"now": 0, "peak": 0, "started": 0}
    lock = threading.Lock()
    sizes = {f"t{i}": 100 for i in range(40)}
    sizes["big"] = 1000  # larger than the cap: still goes, alone

    def write(name, array):
        with lock:
            state["now"] += sizes[name]
            state["peak"] = max(state["peak"], state["now"])
            state["started"] += 1
        time.sleep(0.005)
        with lock:
            state["now"] -= sizes[name]

    jobs = [(n, (lambda: np.zeros(1))) for n in sizes]
    pipeline.copy_tensors(jobs, write, sizes, workers=8, max_bytes=300)
    assert state["started"] == 41 and state["peak"] <= 1000
    # Without the big tensor the cap holds exactly.
    state.update(peak=0, started=0)
    small = {n: s for n, s in sizes.items() if n != "big"}
    pipeline.copy_tensors([(n, (lambda: np.zeros(1))) for n in small], write, small, workers=8, max_bytes=300)
    assert state["peak"] <= 300 and state["started"] == 40

    def failing(name, array):
        write(name, array)
        if name == "t3":
            raise RuntimeError("boom")

    state.update(started=0)
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.copy_tensors([(n, (lambda: np.zeros(1))) for n in small], failing, small, workers=2, max_bytes=200)
    # Two workers, two jobs in flight: at most a couple more start after t3 fails.
    assert state["started"] <= 7


def test_writers_keep_views_of_a_mapped_source_instead_of_staging(tmp_path, monkeypatch):
    """From a memory-mapped release file the torch_dist and jax writers stage nothing on disk
    (the source is the staging); a cast copy is staged."""
    from mugv.io.staging import RawStore

    created = []
    original = RawStore.create

    def spy(self, key, shape, dtype):
        created.append(key)
        return original(self, key, shape, dtype)

    monkeypatch.setattr(RawStore, "create", spy)
    convert(DIT_WEIGHTS, f"megatron:{tmp_path}/td", workers=2)
    # Only the per-head regrouped projections differ from the source bytes.
    assert created and all(
        k.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_kv.weight", "linear_kv.bias")) for k in created
    ), created
    created.clear()
    convert(DIT_WEIGHTS, f"megatron:{tmp_path}/td16", dtype="bfloat16", workers=2)
    assert len(created) == 63
    r = ReleaseReader(DIT_WEIGHTS)
    assert verify(f"megatron:{tmp_path}/td", DIT_WEIGHTS).equal and len(r.entries()) == 63


@pytest.mark.parametrize("shape", [(3, 5), (300, 700), (513, 257), (1000, 1)])
def test_tiled_transpose_moves_the_bits_unchanged(shape):
    import ml_dtypes

    from mugv.layouts.jax import transpose2d

    rng = np.random.default_rng(0)
    for dtype in (np.float32, ml_dtypes.bfloat16, np.float16):
        a = rng.standard_normal(shape).astype(dtype)
        a.view(np.uint8)[..., :1] = 0xFF  # arbitrary bit patterns, not only rounded values
        for src in (a, a[:, ::2]):
            t = transpose2d(src)
            assert t.flags.c_contiguous and t.dtype == src.dtype and t.shape == src.shape[::-1]
            assert np.array_equal(t.view(np.uint8), np.ascontiguousarray(src.T).view(np.uint8))


def test_torch_dist_read_through_dist_checkpointing_equals_the_mapped_read(sources, tmp_path, monkeypatch):
    """Chunkings the mapped reader does not take (a TP-sharded trainer save) go through
    dist_checkpointing, on the pipeline's threads; both give the same bits."""
    from mugv.io.spec import open_reader
    from mugv.io.torch_dist import TorchDistReader

    assert open_reader(sources["torch_dist"]).describe()["read"] == "memory-mapped chunks"
    monkeypatch.setattr(TorchDistReader, "_direct_index", lambda self: {})
    assert open_reader(sources["torch_dist"]).describe()["read"] == "dist_checkpointing"
    convert(sources["torch_dist"], f"release:{tmp_path}/o.safetensors", workers=4)
    assert _bits_equal(DIT_WEIGHTS, f"{tmp_path}/o.safetensors")


def test_jax_output_holds_the_weights_once(tmp_path):
    """The EMA (= params) is an OCDBT copy by reference of the params' chunks: read back equal,
    stored once."""
    convert(DIT_WEIGHTS, f"jax:{tmp_path}/j", workers=2)
    assert verify(DIT_WEIGHTS, f"jax:{tmp_path}/j", weights="ema").equal
    assert verify(DIT_WEIGHTS, f"jax:{tmp_path}/j").equal
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "j") for f in fs)
    weights = os.path.getsize(DIT_WEIGHTS)
    assert on_disk < 1.5 * weights, (on_disk, weights)  # written twice it is about 2x
