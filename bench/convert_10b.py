"""Benchmark the streaming converters on a full-size synthetic checkpoint.

    python bench/convert_10b.py                      # 10B in bfloat16 (~21.7 GB per copy)
    python bench/convert_10b.py --preset 1b --workdir /tmp/bench

Writes a synthetic release `dit.pt` of the preset's full shape (random normal values, one tensor
at a time), then converts it release → jax → release and release → megatron (torch_dist) →
release, verifying each result bit for bit against the original. Every step runs in its own
process and reports wall time, throughput and memory:
  maxrss        getrusage(RUSAGE_SELF).ru_maxrss: counts file pages the step memory-mapped
                (torch.load(mmap=True) of the .pt, the staged torch_dist tensors), which the
                kernel can drop at any time
  children      the same for the processes the step started (dist_checkpointing's writer)
  peak anon     the largest RssAnon sampled every 50 ms: memory only this process holds, what
                decides whether a conversion fits
Everything is deleted at the end. Peak disk use is about three copies of the checkpoint (source,
staging, output during a jax or torch_dist write).

--low-disk keeps at most two formats on disk (peak: the .pt plus the JAX output, params and EMA):
every result is verified against the copy it was made from and that copy is deleted before the
next write, so the chain .pt = jax = .safetensors = torch_dist = .safetensors is bit-exact
link by link, and therefore end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


class _AnonPeak:
    def __init__(self):
        self.peak = _anon_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _anon_kib())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_kib())


def write_synthetic(path: str, preset: str, dtype: str) -> int:
    import numpy as np
    from mugv.io import torchzip
    from mugv.io.base import DTYPE_NAMES, Entry
    from mugv.schema import release_schema
    from mugv.config import get_config
    config = get_config(preset)
    np_dtype = DTYPE_NAMES[dtype]
    schema = release_schema(config)
    slots = {n: torchzip.TensorSlot(str(i), Entry(s, np_dtype)) for i, (n, s) in enumerate(schema.items())}
    out = torchzip.StreamingTorchFile(path, slots, list(slots.values()))
    for i, (name, shape) in enumerate(schema.items()):
        rng = np.random.default_rng(i)
        out.write(slots[name].key, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype))
    out.close()
    return sum(s.entry.nbytes for s in slots.values())


def run_step(step: str, args) -> dict:
    """One step in this process; returns its measurements."""
    from converters.convert import convert, verify
    d = args.workdir
    peak = _AnonPeak()
    t0 = time.perf_counter()
    if step == "write":
        nbytes = write_synthetic(f"{d}/dit.pt", args.preset, args.dtype)
        result = {"bytes": nbytes}
    elif step.startswith("convert:"):
        _, src, dst = step.split("|")
        r = convert(src.replace("@D", d), dst.replace("@D", d), progress=False)
        result = {"bytes": r.bytes_written}
    elif step.startswith("verify:"):
        _, a, b = step.split("|")
        r = verify(a.replace("@D", d), b.replace("@D", d))
        if not r.equal:
            raise SystemExit(f"verify failed: {r.problems[:5]}")
        result = {"tensors": r.compared}
    else:
        raise ValueError(step)
    result["seconds"] = time.perf_counter() - t0
    result["peak_anon_kib"] = peak.stop()
    result["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["children_maxrss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return result


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="10b")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--workdir", default=None, help="default: a new temporary directory")
    p.add_argument("--low-disk", action="store_true",
                   help="verify link by link, deleting each source once its successor is verified")
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        print("RESULT " + json.dumps(run_step(args.step, args)), flush=True)
        return 0

    from converters.convert import human_bytes
    made_workdir = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="mugv-convert-bench-")
    os.makedirs(args.workdir, exist_ok=True)
    steps = [
        ("write synthetic release .pt", "write", None),
        ("release .pt → jax", "convert:|release:@D/dit.pt|jax:@D/jax", "@D/jax"),
        ("jax → release .safetensors", "convert:|jax:@D/jax|release:@D/from_jax.safetensors", "@D/from_jax.safetensors"),
        ("verify release .pt = from jax", "verify:|@D/dit.pt|@D/from_jax.safetensors", None),
        ("release .pt → megatron torch_dist", "convert:|release:@D/dit.pt|megatron:@D/torch_dist", "@D/torch_dist"),
        ("torch_dist → release .safetensors", "convert:|megatron:@D/torch_dist|release:@D/from_td.safetensors", "@D/from_td.safetensors"),
        ("verify release .pt = from torch_dist", "verify:|@D/dit.pt|@D/from_td.safetensors", None),
    ]
    cleanup = {3: ["@D/jax", "@D/from_jax.safetensors"], 6: ["@D/torch_dist", "@D/from_td.safetensors"]}
    if args.low_disk:
        steps = [
            ("write synthetic release .pt", "write", None),
            ("release .pt → jax", "convert:|release:@D/dit.pt|jax:@D/jax", "@D/jax"),
            ("verify release .pt = jax", "verify:|@D/dit.pt|@D/jax", None),
            ("jax → release .safetensors", "convert:|jax:@D/jax|release:@D/from_jax.safetensors", "@D/from_jax.safetensors"),
            ("verify jax = release .safetensors", "verify:|@D/jax|@D/from_jax.safetensors", None),
            ("release .safetensors → megatron torch_dist",
             "convert:|release:@D/from_jax.safetensors|megatron:@D/torch_dist", "@D/torch_dist"),
            ("verify release .safetensors = torch_dist", "verify:|@D/from_jax.safetensors|@D/torch_dist", None),
            ("torch_dist → release .safetensors", "convert:|megatron:@D/torch_dist|release:@D/from_td.safetensors",
             "@D/from_td.safetensors"),
            ("verify torch_dist = release .safetensors", "verify:|@D/torch_dist|@D/from_td.safetensors", None),
        ]
        cleanup = {2: ["@D/dit.pt"], 4: ["@D/jax"], 6: ["@D/from_jax.safetensors"],
                   8: ["@D/torch_dist", "@D/from_td.safetensors"]}
    print(f"preset {args.preset}, {args.dtype}, workdir {args.workdir}", flush=True)
    rows = []
    try:
        for i, (label, step, output) in enumerate(steps):
            cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--dtype", args.dtype,
                   "--workdir", args.workdir, "--step", step]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stderr[-5000:])
                raise SystemExit(f"step {label!r} failed (exit {proc.returncode})")
            r = json.loads(lines[-1][len("RESULT "):])
            size = _du(output.replace("@D", args.workdir)) if output else None
            nbytes = r.get("bytes")
            rate = f"{nbytes / r['seconds'] / 1e6:.0f} MB/s" if nbytes else ""
            row = (f"| {label} | {r['seconds']:.1f} s | {rate} | {human_bytes(r['maxrss_kib'] * 1024)} | "
                   f"{human_bytes(r['children_maxrss_kib'] * 1024)} | {human_bytes(r['peak_anon_kib'] * 1024)} | "
                   f"{human_bytes(size) if size else ''} |")
            rows.append(row)
            print(row, flush=True)
            for path in cleanup.get(i, []):
                shutil.rmtree(path.replace("@D", args.workdir), ignore_errors=True)
                if os.path.exists(path.replace("@D", args.workdir)):
                    os.unlink(path.replace("@D", args.workdir))
    finally:
        if made_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
        else:
            for name in ("dit.pt", "jax", "from_jax.safetensors", "torch_dist", "from_td.safetensors"):
                path = os.path.join(args.workdir, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
                    os.unlink(path) if os.path.exists(path) else None)
    print("\n| step | time | throughput | maxrss | children maxrss | peak anon RSS | output on disk |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
