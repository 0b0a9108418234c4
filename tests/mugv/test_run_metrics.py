"""metrics.jsonl is strict JSON: a non-finite scalar is null plus a note of what it was."""

import json
import math

from mugv.run.metrics import MetricsWriter


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_scalars_are_valid_json(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": -float("inf"), "ok": 0.5, "none": None})
    w.close()
    (line,) = open(tmp_path / "metrics.jsonl").read().splitlines()
    row = _strict(line)
    assert row["step"] == 3 and row["ok"] == 0.5 and row["none"] is None
    assert row["loss"] is None and row["grad_norm"] is None and row["lr"] is None
    assert row["nonfinite"] == {"loss": "nan", "grad_norm": "inf", "lr": "-inf"}
    assert math.isnan(float(row["nonfinite"]["loss"]))
