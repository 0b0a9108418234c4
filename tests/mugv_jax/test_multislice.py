"""Multi-slice (DCN) runs: `configs/mugv_10b.py:<stage>:<pod>x<N>` keeps the stage's global batch
on N slices, the planner plans meshes with `mesh.dcn`, and launch/tpu_multislice.sh refuses a
10B stage laid out for one slice (before: it added mesh.dcn.data=N to the single-slice layout,
whose accumulation then no longer divided or changed the micro-batch)."""

import math
import os
import subprocess
import sys

import jax
import pytest

from mugv_jax import plan as plan_lib
from mugv_jax.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import mugv_10b  # noqa: E402

TPU_PODS = [p for p, spec in mugv_10b.PODS.items() if spec["kind"].startswith("tpu")]


def _per_rank(c):
    """(micro-batch per data-parallel rank, data-parallel ranks) of the first bucket."""
    dp = c.mesh.ici.data * c.mesh.ici.fsdp * c.mesh.dcn.data
    return c.data.buckets[0][3] // c.optim.grad_accum_steps // dp, dp


@pytest.mark.parametrize("pod", TPU_PODS)
def test_every_stage_keeps_its_global_batch_on_several_slices(pod):
    for stage in mugv_10b.STAGES:
        one = mugv_10b.get_config(f"{stage}:{pod}")
        for slices in (2, 4):
            name = f"{stage}:{pod}x{slices}"
            if any(b[3] % (one.mesh.ici.data * one.mesh.ici.fsdp * slices) for b in one.data.buckets):
                with pytest.raises(ValueError, match=rf"does not split over .*\({slices} slices"):
                    mugv_10b.get_config(name)
                continue
            c = mugv_10b.get_config(name)
            assert dict(c.mesh.ici) == dict(one.mesh.ici) and c.mesh.dcn.data == slices
            assert (c.target.devices, c.target.slices, c.target.name) == (
                one.target.devices * slices,
                slices,
                f"{pod}x{slices}",
            )
            # The published global batch, every bucket and the shard loader's.
            assert c.data.buckets == one.data.buckets and c.data.batch_size == one.data.batch_size
            mesh = {**dict(c.mesh.ici), "data": c.mesh.ici.data * slices}
            for b in plan_lib.plan_buckets(c):
                plan_lib.check_batch_split(b[3], c.optim.grad_accum_steps, mesh)
            if c.mode == "pretrain":
                micro, dp = _per_rank(c)
                assert micro <= _per_rank(one)[0]  # never more memory than the planned slice
                assert micro * dp * c.optim.grad_accum_steps == c.data.buckets[0][3]
    # Every stage runs on 2 slices of either pod; GPUs are one pod.
    with pytest.raises(ValueError, match="slices are TPU slices"):
        mugv_10b.get_config("video_720:h100x64x2")


def test_the_planner_plans_a_dcn_mesh(monkeypatch):
    from configs import tiny

    c = tiny.get_config()
    c.mesh.ici = dict(data=-1, fsdp=2, tensor=1, context=1)
    c.mesh.dcn = dict(data=2, fsdp=1, tensor=1, context=1)
    devices = jax.devices()[:8]
    # The fake CPU devices are one slice: the trainer's mesh builder (rightly) refuses dcn there.
    with pytest.raises(ValueError, match="mesh.dcn"):
        mesh_lib.build_mesh(dict(c.mesh.ici), dict(c.mesh.dcn), devices=devices)
    mesh = plan_lib.planning_mesh(c, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "context": 1}
    for b in plan_lib.plan_buckets(c):  # 16 samples over 2 slices × data 2 × fsdp 2
        plan_lib.check_batch_split(b[3], 1, dict(mesh.shape))

    # plan_step compiles on exactly that mesh (the compile itself: tests/mugv_jax/test_plan.py).
    class Planned(Exception):
        pass

    real = plan_lib.planning_mesh

    def spy(config, devs=None):
        raise Planned(dict(real(config, devs).shape))

    monkeypatch.setattr(plan_lib, "planning_mesh", spy)
    with pytest.raises(Planned) as planned:
        plan_lib.plan_step(c, devices=devices)
    assert planned.value.args[0] == dict(mesh.shape)
    with pytest.raises(ValueError, match="explicit positive slice counts"):
        c.mesh.dcn = dict(data=-1, fsdp=1, tensor=1, context=1)
        plan_lib.planning_mesh(c, devices)


def _stub(bin_dir, name, body):
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body + "\n")
    os.chmod(path, 0o755)


def _multislice(tmp_path, config):
    """Run launch/tpu_multislice.sh with gcloud and tar stubbed: (exit status, output, gcloud calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "gcloud_calls"
    _stub(str(bin_dir), "gcloud", f'printf "%s\\n" "$*" >> {calls}')
    _stub(str(bin_dir), "tar", "exit 0")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", QR_NAME="qr", ZONE="z", NUM_SLICES="2")
    env["SKIP_COPY"] = "1"
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu_multislice.sh"), config, "gs://b/run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr, calls.read_text().splitlines() if calls.exists() else []


def test_multislice_script_needs_the_slices_in_a_10b_config(tmp_path):
    code, out, calls = _multislice(tmp_path, "configs/mugv_10b.py:video_720")
    assert code == 2 and "configs/mugv_10b.py:video_720:v5p-256x2" in out and not calls, out
    code, out, calls = _multislice(tmp_path, "configs/mugv_10b.py:video_720:v5p-256x2@gs://b/root")
    assert code == 0, out
    assert len(calls) == 2 and all("--config=configs/mugv_10b.py:video_720:v5p-256x2@gs://b/root" in c for c in calls)
    assert all("--config.mesh.dcn.data=2" in c for c in calls) and sorted(c.split()[4] for c in calls) == [
        "qr-0",
        "qr-1",
    ]
    # The mesh it asks for covers both slices' devices.
    c = mugv_10b.get_config("video_720:v5p-256x2")
    assert math.prod(dict(c.mesh.ici).values()) * c.mesh.dcn.data == 2 * mugv_10b.PODS["v5p-256"]["devices"]
