"""bench/device_check.sh --dry-run: every part of the GPU check runs at tiny width on the CPU."""

import os
import subprocess
import sys

import pytest

from tests.doc_commands import doc_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The default parts (bench/device_check.py DEFAULT_PARTS) and the geometry row.
PARTS = (
    "geometry",
    "jax_step_cudnn",
    "jax_cudnn_full_shipped",
    "jax_cudnn_dots_no_batch_shipped",
    "jax_cudnn_offload_dots_shipped",
    "jax_cudnn_save_qkv_attn_shipped",
    "megatron_step",
    "jax_golden",
    "megatron_golden",
    "jax_step_xla",
    "megatron_distopt",
)
BUCKETS = ("attention fwd", "attention bwd", "matmuls", "norms/elementwise", "collectives", "other")


def _run(tmp_path, *extra, **env_extra):
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    env.pop("OUT", None)
    # docs/benchmarks.md's command, with this test's output directory.
    argv = doc_command(
        "docs/benchmarks.md", "bash bench/device_check.sh --dry-run", {"/tmp/device-check": str(tmp_path)}
    )
    proc = subprocess.run(
        [*argv, *extra],
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
    table = out[out.index("part                             backend") :]
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
    for name in PARTS[1:6]:  # each remat policy's cuDNN step lowers to the padding kernels, no bias
        assert results[name]["lowered_kernels"] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], name
    # The CPU steps were profiled: their own ops bucketed, the buckets adding up to the busy time.
    for name, attention in (("jax_step_xla", "attention bwd"), ("megatron_step", "attention fwd")):
        prof = results[name]["profile"]
        assert prof["buckets_ms"]["matmuls"] > 0 and prof["buckets_ms"][attention] > 0, (name, prof)
        assert sum(prof["buckets_ms"].values()) == pytest.approx(prof["busy_ms"], rel=1e-9)
        assert prof["busy_ms"] + prof["host_gaps_ms"] == pytest.approx(prof["step_ms"], rel=1e-9)
    assert results["jax_step_xla"]["profile"]["buckets_ms"]["attention fwd"] > 0
    assert "  profile xla/remat=full/flags=none on cpu" in out and "  profile megatron/sdpa on cpu" in out
    # The profiled ops came back in their own file, and re-bucket to the same tables anywhere.
    argv = doc_command("docs/benchmarks.md", "python bench/profile_table.py", {"/tmp/device-check": str(tmp_path)})
    again = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    for name in ("jax_step_xla", "megatron_step"):
        title = next(line for line in again.stdout.splitlines() if line.startswith(f"{name} (re-bucketed"))
        rows = again.stdout[again.stdout.index(title) :].splitlines()[2:9]
        got = {line[:22].strip(): float(line.split()[-2]) for line in rows}
        want = results[name]["profile"]["buckets_ms"]
        assert all(got[c] == pytest.approx(want[c], abs=1e-3) for c in BUCKETS), (name, got, want)
    assert (tmp_path / "device_check.log").read_text().endswith(table.rstrip("\n") + "\n")


def test_parts_run_isolated_and_unknown_parts_are_named(tmp_path):
    """The GPU mode's one-process-per-part path: the cheapest part, and a JAX variant with a named
    save-list and the shipped XLA flags profiled in its own process."""
    import json

    variant = "jax_xla_save_qkv_attn_shipped"
    code, out = _run(tmp_path, "--isolate", "--parts", f"megatron_golden,{variant}")
    assert code == 0, out[-4000:]
    assert "  | " in out and "sdpa/float32/t2v" in out
    assert "  |   profile xla/remat=save_qkv_attn/flags=shipped on cpu" in out
    result = json.loads((tmp_path / "device_check.json").read_text())[variant]
    assert result["status"] == "ok" and result["profile"]["buckets_ms"]["matmuls"] > 0
    code, out = _run(tmp_path, "--parts", "nonsense")
    assert code != 0 and "unknown parts ['nonsense']" in out


def test_no_part_starts_past_the_budget_counted_from_the_script_start(tmp_path):
    import time

    # As if the Transformer Engine install had taken 1000 s of the 480 s budget.
    code, out = _run(tmp_path, "--isolate", "--parts", "megatron_golden", DEVICE_CHECK_STARTED=str(time.time() - 1000))
    assert code == 0, out[-4000:]
    assert "the --budget of 480 s is spent; run it alone with --parts megatron_golden" in out
    assert "  | " not in out  # no part process was started


def test_the_shipped_xla_flags_are_read_from_the_gpu_launch_script(tmp_path):
    from bench import device_check

    flags = device_check.shipped_xla_flags()
    assert flags["xla_gpu_enable_latency_hiding_scheduler"] is True
    assert flags["xla_gpu_all_gather_combine_threshold_bytes"] == 134217728
    script = tmp_path / "x.sbatch"
    script.write_text("export XLA_FLAGS=--nothing\n")
    with pytest.raises(ValueError, match="x.sbatch: no 'export XLA_FLAGS"):
        device_check.shipped_xla_flags(str(script))


def test_a_part_cut_by_the_budget_says_so(tmp_path, monkeypatch):
    from bench import device_check

    timeouts = []

    def stopped(name, args, timeout):
        timeouts.append(timeout)
        return dict(status="timeout", reason=f"stopped after {timeout:.0f} s", wall_s=timeout)

    monkeypatch.setattr(device_check, "run_isolated", stopped)
    monkeypatch.setattr(device_check, "geometry_check", lambda args: dict(status="ok"))
    monkeypatch.setenv("DEVICE_CHECK_STARTED", "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main() sets it for the dry run: undone after the test
    code = device_check.main(
        ["--dry-run", "--isolate", "--parts", "megatron_step", "--budget", "50", "--out", str(tmp_path)]
    )
    assert code == 1 and len(timeouts) == 1 and 45 < timeouts[0] <= 50  # the budget's rest, not the part's 100 s
    import json

    reason = json.loads((tmp_path / "device_check.json").read_text())["megatron_step"]["reason"]
    assert "the end of the --budget; alone: --parts megatron_step" in reason
