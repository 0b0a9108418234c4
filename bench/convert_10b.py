"""Benchmark the streaming, parallel converters on a full-size synthetic checkpoint.

    python bench/convert_10b.py --low-disk           # 10B in bfloat16 (~21.7 GB per copy)
    python bench/convert_10b.py --preset 1b --workdir /tmp/bench [--workers N]

Writes a synthetic release `dit.pt` of the preset's full shape (random normal values, one tensor
at a time), then converts it release → jax → release and release → megatron (torch_dist) →
release, verifying each result bit for bit. Every conversion is compared with a plain copy of
the same bytes measured in the same run: `cp` (then fsync) of the release-format file next to
it (its source, or its output), so the ratio says how close a conversion gets to the disk.
Every step runs in its own process and reports wall time, throughput and memory:
  ratio         conversion MB/s ÷ copy MB/s (checkpoint bytes over wall time, both)
  CPU time      user + system seconds of the step and its children (imports included)
  maxrss        getrusage(RUSAGE_SELF).ru_maxrss: counts file pages the step memory-mapped
                (the release source, kept views), which the kernel can drop at any time
  peak anon     the largest sum of Pss_Anon over the step's process and its children (the
                torch_dist writer forks), sampled every 100 ms: anonymous memory they hold,
                pages a fork still shares counted once; what decides whether a conversion fits
Everything is deleted at the end.

--low-disk keeps at most two formats on disk (peak: the .pt plus the JAX output, params and EMA):
every result is verified against the copy it was made from and that copy is deleted before the
next write, so the chain .pt = jax = .safetensors = torch_dist = .safetensors is bit-exact
link by link, and therefore end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _anon_kib(pid: int | str = "self") -> int:
    """Pss_Anon: a forked child's pages still shared with its parent count once over the tree."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for c in children:
            out += [c, *_descendants(c)]
    return out


def _tree_anon_kib() -> int:
    me = os.getpid()
    return _anon_kib(me) + sum(_anon_kib(c) for c in _descendants(me))


class _AnonPeak:
    def __init__(self):
        self.peak = _tree_anon_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _tree_anon_kib())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _tree_anon_kib())


def write_synthetic(path: str, preset: str, dtype: str) -> int:
    import numpy as np

    from mugv.config import get_config
    from mugv.io import torchzip
    from mugv.io.base import DTYPE_NAMES, Entry
    from mugv.schema import release_schema

    config = get_config(preset)
    np_dtype = DTYPE_NAMES[dtype]
    schema = release_schema(config)
    slots = {n: torchzip.TensorSlot(str(i), Entry(s, np_dtype)) for i, (n, s) in enumerate(schema.items())}
    out = torchzip.StreamingTorchFile(path, slots, list(slots.values()))

    def fill(i_name_shape):
        # One generator per tensor (the values do not depend on the threads); numpy's
        # generators release the GIL, so the threads draw in parallel.
        i, (name, shape) = i_name_shape
        rng = np.random.default_rng(i)
        out.write(slots[name].key, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(fill, enumerate(schema.items())))
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
        r = convert(src.replace("@D", d), dst.replace("@D", d), progress=False, workers=args.workers)
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
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the step (imports included), its forked writers too: on a shared machine
    # the wall time depends on the other jobs, the CPU time much less.
    result["cpu_seconds"] = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    result["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def copy_baseline(src: str, workdir: str) -> dict:
    """`cp` of `src` (then fsync, as the converters' writers do), timed; the copy is deleted."""
    dst = os.path.join(workdir, "copy-baseline")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", src, dst], check=True)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(dst)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"bytes": os.path.getsize(src), "seconds": seconds, "cpu_seconds": cpu}


def machine() -> str:
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2**20
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return f"{platform.node()}: {os.cpu_count()} CPUs ({model}), {mem:.1f} GiB RAM, {platform.platform()}"


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="10b")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--workdir", default=None, help="default: a new temporary directory")
    p.add_argument("--workers", type=int, default=None, help="converter threads (default: the converters' own)")
    p.add_argument(
        "--low-disk",
        action="store_true",
        help="verify link by link, deleting each source once its successor is verified",
    )
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        print("RESULT " + json.dumps(run_step(args.step, args)), flush=True)
        return 0

    from converters.convert import human_bytes
    from converters.pipeline import default_workers

    made_workdir = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="mugv-convert-bench-")
    os.makedirs(args.workdir, exist_ok=True)
    # (label, step, output, copy baseline it is compared with); "copy:NAME|PATH" measures NAME.
    if args.low_disk:
        steps = [
            ("write synthetic release .pt", "write", None, None),
            ("copy release .pt", "copy:C1|@D/dit.pt", None, None),
            ("release .pt → jax", "convert:|release:@D/dit.pt|jax:@D/jax", "@D/jax", "C1"),
            ("verify release .pt = jax", "verify:|@D/dit.pt|@D/jax", None, None),
            (
                "jax → release .safetensors",
                "convert:|jax:@D/jax|release:@D/from_jax.safetensors",
                "@D/from_jax.safetensors",
                "C2",
            ),
            ("verify jax = release .safetensors", "verify:|@D/jax|@D/from_jax.safetensors", None, None),
            ("copy release .safetensors", "copy:C2|@D/from_jax.safetensors", None, None),
            (
                "release .safetensors → megatron torch_dist",
                "convert:|release:@D/from_jax.safetensors|megatron:@D/torch_dist",
                "@D/torch_dist",
                "C2",
            ),
            ("verify release .safetensors = torch_dist", "verify:|@D/from_jax.safetensors|@D/torch_dist", None, None),
            (
                "torch_dist → release .safetensors",
                "convert:|megatron:@D/torch_dist|release:@D/from_td.safetensors",
                "@D/from_td.safetensors",
                "C3",
            ),
            ("verify torch_dist = release .safetensors", "verify:|@D/torch_dist|@D/from_td.safetensors", None, None),
            ("copy release .safetensors (end)", "copy:C3|@D/from_td.safetensors", None, None),
        ]
        cleanup = {
            3: ["@D/dit.pt"],
            5: ["@D/jax"],
            8: ["@D/from_jax.safetensors"],
            10: ["@D/torch_dist"],
            11: ["@D/from_td.safetensors"],
        }
    else:
        steps = [
            ("write synthetic release .pt", "write", None, None),
            ("copy release .pt", "copy:C1|@D/dit.pt", None, None),
            ("release .pt → jax", "convert:|release:@D/dit.pt|jax:@D/jax", "@D/jax", "C1"),
            (
                "jax → release .safetensors",
                "convert:|jax:@D/jax|release:@D/from_jax.safetensors",
                "@D/from_jax.safetensors",
                "C1",
            ),
            ("verify release .pt = from jax", "verify:|@D/dit.pt|@D/from_jax.safetensors", None, None),
            (
                "release .pt → megatron torch_dist",
                "convert:|release:@D/dit.pt|megatron:@D/torch_dist",
                "@D/torch_dist",
                "C1",
            ),
            (
                "torch_dist → release .safetensors",
                "convert:|megatron:@D/torch_dist|release:@D/from_td.safetensors",
                "@D/from_td.safetensors",
                "C1",
            ),
            ("verify release .pt = from torch_dist", "verify:|@D/dit.pt|@D/from_td.safetensors", None, None),
        ]
        cleanup = {4: ["@D/jax", "@D/from_jax.safetensors"], 7: ["@D/torch_dist", "@D/from_td.safetensors"]}
    workers = args.workers or default_workers()
    print(f"preset {args.preset}, {args.dtype}, workdir {args.workdir}, converter workers {workers}", flush=True)
    print(f"machine: {machine()}", flush=True)
    copies: dict[str, float] = {}
    rows = []
    try:
        for i, (label, step, output, baseline) in enumerate(steps):
            load_before = _load()
            if step.startswith("copy:"):
                name, path = step[len("copy:") :].split("|")
                r = copy_baseline(path.replace("@D", args.workdir), args.workdir)
                copies[name] = r["bytes"] / r["seconds"]
                rows.append(dict(label=label, r=r, size=None, baseline=None, load=(load_before, _load())))
            else:
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--preset",
                    args.preset,
                    "--dtype",
                    args.dtype,
                    "--workdir",
                    args.workdir,
                    "--step",
                    step,
                ]
                if args.workers:
                    cmd += ["--workers", str(args.workers)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.stderr.write(proc.stderr[-5000:])
                    raise SystemExit(f"step {label!r} failed (exit {proc.returncode})")
                r = json.loads(lines[-1][len("RESULT ") :])
                size = _du(output.replace("@D", args.workdir)) if output else None
                rows.append(dict(label=label, r=r, size=size, baseline=baseline, load=(load_before, _load())))
            print(_row(rows[-1], copies, human_bytes), flush=True)
            for path in cleanup.get(i, []):
                path = path.replace("@D", args.workdir)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    finally:
        if made_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
        else:
            for name in ("dit.pt", "jax", "from_jax.safetensors", "torch_dist", "from_td.safetensors", "copy-baseline"):
                path = os.path.join(args.workdir, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
                    os.unlink(path) if os.path.exists(path) else None
                )
    print(f"\nmachine: {machine()}")
    print(
        "\n| step | time | CPU time | throughput | vs copy | peak anon (process tree) | maxrss | output on disk "
        "| load before/after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(_row(row, copies, human_bytes) for row in rows))
    return 0


def _row(row: dict, copies: dict, human_bytes) -> str:
    r = row["r"]
    nbytes = r.get("bytes")
    rate = nbytes / r["seconds"] if nbytes else None
    ratio = ""
    if row["baseline"] and row["baseline"] in copies and rate:
        ratio = f"{rate / copies[row['baseline']]:.2f} (copy {copies[row['baseline']] / 1e6:.0f} MB/s)"
    anon = human_bytes(r["peak_anon_kib"] * 1024) if "peak_anon_kib" in r else ""
    rss = human_bytes(r["maxrss_kib"] * 1024) if "maxrss_kib" in r else ""
    size = human_bytes(row["size"]) if row["size"] else ""
    cpu = f"{r['cpu_seconds']:.1f} s" if "cpu_seconds" in r else ""
    return (
        f"| {row['label']} | {r['seconds']:.1f} s | {cpu} | {f'{rate / 1e6:.0f} MB/s' if rate else ''} | {ratio} | "
        f"{anon} | {rss} | {size} | {row['load'][0]} → {row['load'][1]} |"
    )


if __name__ == "__main__":
    sys.exit(main())
