"""bench/device_check.sh --dry-run: every part of the GPU check runs at tiny width on the CPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = (
    "geometry",
    "jax_golden",
    "megatron_golden",
    "jax_step_xla",
    "jax_step_cudnn",
    "megatron_step",
    "megatron_distopt",
)


def _run(tmp_path, *extra):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "device_check.sh"), "--dry-run", "--out", str(tmp_path), *extra],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=900,
    )
    return proc.returncode, proc.stdout


def test_dry_run_completes_and_prints_the_table(tmp_path):
    import json

    code, out = _run(tmp_path)
    assert code == 0, out[-4000:]
    table = out[out.index("part             backend") :]
    for part in PARTS:
        row = next(line for line in table.splitlines() if line.startswith(part))
        assert " ok " in row, row
    # The cuDNN parts were lowered for CUDA with the padding kernels only (no bias kernels).
    assert "cudnn arguments at 720p pass JAX's checks" in out
    assert "50402 tokens" in out
    assert "te spec: skipped: no CUDA device" in out
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert set(results) == set(PARTS)
    assert results["jax_step_cudnn"]["lowered_kernels"] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    assert results["megatron_step"]["backend"] == "megatron/sdpa"
    assert (tmp_path / "device_check.log").read_text().endswith(table.rstrip("\n") + "\n")


def test_parts_run_isolated_and_unknown_parts_are_named(tmp_path):
    """The GPU mode's one-process-per-part path, on the cheapest part."""
    code, out = _run(tmp_path, "--isolate", "--parts", "megatron_golden")
    assert code == 0, out[-4000:]
    assert "  | " in out and "sdpa/float32/t2v" in out
    code, out = _run(tmp_path, "--parts", "nonsense")
    assert code != 0 and "unknown parts ['nonsense']" in out
