"""Lower every shipped 10B layout for its pod's platform at the pod's device count (docs/scaling.md).

    python bench/export_pods.py [--stages=video_720,sft] [--pods=v5p-256,h100x64]

Each distinct train step (stages sharing one are lowered once, as in bench/plan_targets.py) is
`python -m mugv_jax.export --config=configs/mugv_10b.py:<stage>:<pod>` in a fresh process: TPU
pods over an abstract mesh of TPU devices, GPU pods over as many fake CPU devices (cuDNN's lowering
needs concrete devices). A row is "complete" when every attention (self and cross, forward and
backward) calls the fused kernel on its per-device operands and the planned shardings hold.
Exit status 1 if any row is not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_common import ROOT, machine, mugv_10b  # noqa: E402
from plan_targets import programs  # noqa: E402


def export(stage: str, pod: str, bucket) -> tuple[bool, str, float]:
    cmd = [sys.executable, "-m", "mugv_jax.export", f"--config=configs/mugv_10b.py:{stage}:{pod}"]
    if bucket is not None:
        cmd.append(f"--bucket={bucket}")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return proc.returncode == 0, (proc.stdout or proc.stderr[-2000:]).strip(), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(mugv_10b.STAGES))
    ap.add_argument("--pods", default=",".join(mugv_10b.PODS))
    args = ap.parse_args()
    print(f"{machine()}; python -m mugv_jax.export per row", flush=True)
    ok = True
    for names, pod, bucket in programs(args.stages.split(","), args.pods.split(",")):
        if bucket == "skip":
            continue
        complete, text, seconds = export(names[0], pod, bucket)
        ok &= complete
        label = ", ".join(names) + (" (images)" if bucket is not None else "")
        print(
            f"## {label} on {pod}: {'complete' if complete else 'INCOMPLETE'} ({seconds:.0f} s)\n{text}\n", flush=True
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
