"""Cold and warm compile of the JAX train step: two starts of the same run, one persistent cache.

    python bench/compile_cache.py                       # configs/tiny.py, 2 steps per start
    python bench/compile_cache.py --config configs/tiny.py --steps 3

Starts the same run of `python -m mugv_jax.train` three times, each in a fresh workdir: twice
with one persistent cache (MUGV_COMPILATION_CACHE, mugv_jax/compilation_cache.py), so the second
start finds everything the first compiled, and once with the cache off. JAX's compile log is on;
for each start it prints the train steps' compile seconds as JAX logs them (on a cache hit, the
load), whether the cache was hit, and the start's wall seconds (imports, data, every compile).
The machine is named; results go in docs/benchmarks.md. It starts three trainers (minutes on a
2-core machine), so the suite does not run it: tests/mugv_jax/test_train_loop.py checks the cache hit.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = "jit(_step_fn)"


def start(workdir, config, steps, cache):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_LOG_COMPILES="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env["MUGV_COMPILATION_CACHE"] = cache
    cmd = [sys.executable, "-m", "mugv_jax.train", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.num_steps={steps}", "--config.log_every=1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    log = proc.stderr
    compile_s = [
        float(m) for m in re.findall(rf"Finished XLA compilation of {re.escape(STEP)} in ([\d.e+-]+) sec", log)
    ]
    hit = "Persistent compilation cache hit for 'jit__step_fn'" in log
    return dict(wall=wall, compile=compile_s, hit=hit)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--steps", type=int, default=2, help="steps per start")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    print(f"{platform.node()}, {os.cpu_count()} cores, load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; {args.config}")
    with tempfile.TemporaryDirectory(prefix="compile-cache-") as tmp:
        cache = os.path.join(tmp, "jax_cache")
        rows = [
            ("first start (cold cache)", start(os.path.join(tmp, "a"), args.config, args.steps, cache)),
            ("second start (warm cache)", start(os.path.join(tmp, "b"), args.config, args.steps, cache)),
            ("a start with the cache off", start(os.path.join(tmp, "c"), args.config, args.steps, "off")),
        ]
    print(f"{'start':<36} {'step compile s':>15} {'cache hit':>10} {'wall s':>8}")
    for name, r in rows:
        comp = "+".join(f"{c:.2f}" for c in r["compile"]) or "-"
        print(f"{name:<36} {comp:>15} {str(r['hit']):>10} {r['wall']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
