"""bench/cpu_vs_torch.py: the sides agree before they are timed, and the report has every ratio."""

import os
import subprocess
import sys

import numpy as np

from bench import cpu_vs_torch as bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIT_SIDES = ("jax", "torch/sdpa", "torch/math", "megatron/sdpa", "megatron/local")


def test_tiny_run_agrees_and_prints_ratios(tmp_path):
    """The documented smoke test minus the train step (its JAX compile is the costliest; the same
    code times it in the measured runs of docs/benchmarks.md)."""
    cmd = [sys.executable, "bench/cpu_vs_torch.py", "--preset", "tiny", "--parts", "dit,vae", "--vae", "tiny:16"]
    cmd += ["--repeats", "1", "--fast-compile", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = proc.stdout
    assert "MISMATCH" not in out and "NOT representative" in out
    assert "allocator: glibc keeps freed memory, for every side" in out
    report = (tmp_path / "report.txt").read_text()
    assert report == out
    for side in DIT_SIDES[1:]:
        rows = [line.split() for line in out.splitlines() if line.split()[1:2] == [side]]
        assert [r[0] for r in rows] == ["forward", "forward+backward"], side
        assert all(float(r[-1]) > 0 for r in rows)  # JAX ÷ side
    assert sum(line.split()[:2] in (["encode", "torch"], ["decode", "torch"]) for line in out.splitlines()) == 2
    assert "tiny:16" in report and "vs torch: recon" in report


def test_child_xla_flags_are_all_read(monkeypatch):
    """XLA reads XLA_FLAGS only up to the first token that is not a --flag: --fast-compile's
    level-0 flag must be one XLA sees (a child compiles with it)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    bench._single_thread_env(fast_compile=True)
    tokens = os.environ["XLA_FLAGS"].split()
    assert "--xla_backend_optimization_level=0" in tokens
    assert all(t.startswith("--") for t in tokens), tokens
    bench._single_thread_env(fast_compile=False)
    assert "--xla_backend_optimization_level=0" not in os.environ["XLA_FLAGS"].split()


FAULTS = """
import ctypes, ctypes.util, resource, sys, threading
sys.path.insert(0, {root!r})
from bench import cpu_vs_torch as bench
if sys.argv[1] == "keep":
    bench.keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def work():  # as XLA's CPU client does: one large temp buffer per call, from a worker thread
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = libc.malloc(100 << 20)
        ctypes.memset(a, 1, 100 << 20)
        libc.free(a)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start()
t.join()
print(max(faults[1:]))
"""


def test_keep_freed_memory_stops_the_per_call_page_faults():
    """A 100 MB buffer allocated, touched and freed again and again by a thread: with glibc's
    defaults each round maps it afresh (~24,000 page faults); with keep_freed_memory none."""
    code = FAULTS.format(root=ROOT)
    faults = {}
    for mode in bench.ALLOCATORS:
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        faults[mode] = int(proc.stdout.split()[-1])
    assert faults["system"] > 20_000, faults
    assert faults["keep"] < 100, faults


def test_a_disagreement_fails_the_run():
    rng = np.random.default_rng(0)
    out, grads = rng.standard_normal((2, 3)), {"a": rng.standard_normal(4), "b": rng.standard_normal(5)}
    results = {"torch/sdpa": (out, grads), "jax": (out + 1e-6, dict(grads))}
    ok, lines = bench.check_dit(results)
    assert ok and "MISMATCH" not in lines[0]
    results["jax"] = (out, {"a": grads["a"], "b": grads["b"] * (1 + 1e-3)})
    ok, lines = bench.check_dit(results)
    assert not ok and "MISMATCH" in lines[0] and "(≤ 0.0001, b)" in lines[0]
    ok, lines = bench.check_vae({"torch": {"z": out}, "jax": {"z": out + 1e-3}})
    assert not ok and "MISMATCH" in lines[0]
    ok, _ = bench.check_step({"jax": [2.0], "megatron/sdpa": [2.0 * (1 + 1e-4)]})
    assert not ok
