"""Shared pieces of bench/plan_search.py and bench/plan_targets.py: run the planner for one
configs/mugv_10b.py stage × pod (one fresh process per plan: the fake device count is fixed when
jax starts) and collect its JSON summary."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import mugv_10b  # noqa: E402,F401 (the stage table the benches walk)

GiB = 1024**3


def overrides(layout: dict) -> list[str]:
    """Command-line overrides for a layout {mesh: (d, f, t, c), attention, remat, accum}."""
    d, f, t, c = layout["mesh"]
    return [
        f"--config.mesh.ici.data={d}",
        f"--config.mesh.ici.fsdp={f}",
        f"--config.mesh.ici.tensor={t}",
        f"--config.mesh.ici.context={c}",
        f"--config.attention={layout['attention']}",
        f"--config.remat={layout['remat']}",
        f"--config.optim.grad_accum_steps={layout['accum']}",
    ]


def run_plan(
    stage: str,
    pod: str,
    extra: list[str] = (),
    bucket: int | None = None,
    log_dir: str | None = None,
    timeout: float = 3600,
) -> dict:
    """Plan `stage` on `pod` in a fresh process; returns the planner's JSON summary plus the
    process's wall and CPU seconds, or {"error": ...} when the planner failed to produce one."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        cmd = [
            sys.executable,
            "-m",
            "mugv_jax.plan",
            f"--config=configs/mugv_10b.py:{stage}:{pod}",
            f"--json={out}",
            *extra,
        ] + ([f"--bucket={bucket}"] if bucket is not None else [])
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("XLA_FLAGS", None)
        t0, c0 = time.perf_counter(), os.times()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        c1 = os.times()
        wall = time.perf_counter() - t0
        cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            name = f"{stage}_{pod}_{abs(hash(tuple(extra))) % 10**8}_{bucket}.log"
            with open(os.path.join(log_dir, name), "w") as f:
                f.write(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        if not os.path.exists(out):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            return {"error": " | ".join(tail), "command": " ".join(cmd), "wall_seconds": wall, "cpu_seconds": cpu}
        with open(out) as f:
            result = json.load(f)
    result.update(command=" ".join(cmd), wall_seconds=wall, cpu_seconds=cpu, report=proc.stdout)
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()}-core {cpu}, {platform.system()} (load average {load:.1f} at start)"
