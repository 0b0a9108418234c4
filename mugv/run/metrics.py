"""Console progress lines and TensorBoard scalars (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import json
import math
import os
import sys
import time


def json_row(step: int, scalars: dict) -> str:
    """One strict-JSON line: a non-finite value is written as null and named, with what it was,
    under "nonfinite" (a bare NaN is not JSON, and strict parsers refuse the whole file)."""
    row: dict = {"step": step, "time": time.time()}
    bad = {}
    for k, v in scalars.items():
        v = None if v is None else float(v)
        if v is not None and not math.isfinite(v):
            bad[k] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            v = None
        row[k] = v
    if bad:
        row["nonfinite"] = bad
    return json.dumps(row, allow_nan=False)


class MetricsWriter:
    """Writes scalars to TensorBoard event files and a JSON-lines log under `logdir`, and prints a
    one-line summary per logging step. Only process 0 writes."""

    def __init__(self, logdir: str, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self.tb = SummaryWriter(logdir, flush_secs=10)
            self.jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            if v is not None:
                self.tb.add_scalar(k, float(v), step)
        self.jsonl.write(json_row(step, scalars) + "\n")
        self.jsonl.flush()

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def console(self, step: int, total: int, s: dict[str, float]) -> None:
        if not self.enabled:
            return

        def fmt(key, spec, scale=1.0, suffix=""):
            v = s.get(key)
            return None if v is None else f"{key.split('/')[-1]} {format(v * scale, spec)}{suffix}"

        parts = [
            f"step {step}/{total}",
            fmt("loss", ".4f"),
            fmt("grad_norm", ".3f"),
            fmt("learning_rate", ".2e"),
            fmt("step_time", ".3f", suffix="s"),
            fmt("tokens_per_second", ",.0f"),
            fmt("tflops_per_device", ".2f"),
            fmt("mfu", ".1%"),
        ]
        if s.get("skipped_steps"):
            parts.append(f"skipped {int(s['skipped_steps'])}")
        print(" | ".join(p for p in parts if p), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.jsonl.close()
