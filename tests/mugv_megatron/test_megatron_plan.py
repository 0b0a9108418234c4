"""`python -m mugv_megatron.plan` and the Megatron layouts of configs/mugv_10b.py.

Before these layouts every 10B stage ran Megatron with `recompute="none"` and the TPU layout's
accumulation: 720p with TP 4 + SP + CP 2 needs ~157 GiB per GPU (the planner says so and offers
the layouts that fit); the shipped H100 layouts fit 80 GB, are the ones the planner's search picks,
and docs/scaling.md shows their table exactly as bench/plan_targets.py prints it.
"""

import json
import os
import subprocess
import sys

import pytest

from mugv.run.config import model_config_from
from mugv_megatron import plan as mplan
from tests.doc_commands import doc_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import mugv_10b  # noqa: E402
import plan_targets  # noqa: E402

H100_PODS = sorted({pod for _, pod in mugv_10b.MEGATRON_LAYOUTS})


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "mugv_megatron.plan", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_cli_plans_video_720_on_128_h100s_within_80_gb(tmp_path):
    # The command README.md and docs/megatron_training.md show (docs/scaling.md's, without its optional flags).
    argv = doc_command("README.md", "python -m mugv_megatron.plan")
    assert argv == doc_command(
        "docs/megatron_training.md", "python -m mugv_megatron.plan --config=configs/mugv_10b.py:video_720:h100x128"
    )
    assert argv == doc_command("docs/scaling.md", "python -m mugv_megatron.plan")
    code, out = _cli(*argv[3:], f"--json={tmp_path / 'plan.json'}")
    assert code == 0, out
    summary = json.loads((tmp_path / "plan.json").read_text())
    assert summary["fits"] and summary["gpus"] == 128 and summary["kind"] == "h100"
    assert summary["total_bytes"] + mplan.OUTSIDE_ALLOCATOR <= 0.9 * 80 * 1000**3  # 80 GB, 10% headroom
    assert summary["layout"]["recompute"] == "full" and summary["layout"]["micro_batch"] == 1
    # micro-batch × DP × accumulation is the stage's published global batch, for every bucket.
    for b in summary["buckets"]:
        assert b["micro_batch"] * summary["data_parallel"] * b["accumulation"] == b["bucket"][3] == 256
    assert "fits" in out and "dominant:" in out and "weights + grads" in out


def test_cli_says_what_to_change_when_it_does_not_fit():
    # What the 10B stages ran before their layouts: no recompute (TP 4 + SP, CP 2 at 720p).
    code, out = _cli(
        "--config=configs/mugv_10b.py:video_720:h100x128",
        "--config.megatron.tp=4",
        "--config.megatron.sp=true",
        "--config.megatron.cp=2",
        "--config.megatron.recompute=none",
    )
    assert code == 1, out
    assert "DOES NOT FIT" in out
    total = float(out.split("total (torch allocator)")[1].split("GiB")[0])
    assert 140 < total < 175, total  # the rough ~166 GB
    fixes = out.split("layouts that fit, fastest first")[1]
    assert "--config.megatron.recompute=full" in fixes and "--config.megatron.micro_batch_size=1" in fixes


def test_cli_refuses_a_batch_split_naming_the_keys():
    # The TPU layout's accumulation (16 on v5p) with Megatron's DP of 128: 2 samples per rank.
    code, out = _cli("--config=configs/mugv_10b.py:video_720", "--gpus=128", "--kind=h100")
    assert code == 2, out
    assert "config.optim.grad_accum_steps=8" in out and "config.megatron.micro_batch_size" in out
    code, out = _cli("--config=configs/mugv_10b.py:video_720:h100x128", "--config.megatron.micro_batch_size=3")
    assert code == 2 and "not a multiple of config.megatron.micro_batch_size=3" in out, out


def test_batch_split():
    assert mplan.batch_split(256, 64, 1, 99) == (1, 4)
    assert mplan.batch_split(256, 64, None, 2) == (2, 2)
    with pytest.raises(ValueError, match=r"not divisible by the data-parallel size 3 = GPUs / \(config.megatron.tp"):
        mplan.batch_split(256, 3, 1, 1)
    with pytest.raises(ValueError, match="config.megatron.micro_batch_size=3"):
        mplan.batch_split(256, 64, 3, 1)
    with pytest.raises(ValueError, match=r"GPUs are not divisible by config.megatron.tp=4 × cp=2 × pp=4"):
        mplan.data_parallel_size(48, 4, 2, 4)


@pytest.mark.parametrize("pod", H100_PODS)
def test_every_stage_has_a_megatron_layout_that_fits_and_is_the_searched_one(pod):
    for stage in mugv_10b.STAGES:
        c = mugv_10b.get_config(f"{stage}:{pod}")
        m = c.megatron
        if c.mode == "preference":  # no accumulation; the DPO/KTO step is not planned
            assert m.micro_batch_size is None and m.pp == 1 and m.cp == 1
            continue
        p = mplan.plan_config(c, c.target.devices, "h100")
        assert p.fits, (stage, pod, p.total / mplan.GiB)
        assert (m.tp, m.sp, m.pp, m.cp, m.recompute) == (
            p.layout.tp,
            p.layout.sp,
            p.layout.pp,
            p.layout.cp,
            p.layout.recompute,
        )
        best = mplan.search(
            model_config_from(c), mplan.run_buckets(c), gpus=c.target.devices, kind="h100", text_len=c.data.text_len
        )[0]
        assert best.layout == p.layout, (stage, pod, best.layout.describe(), p.layout.describe())
    # TPU pods keep the defaults: the Megatron trainer is not laid out for them.
    assert mugv_10b.get_config("video_720:v5p-256").megatron.micro_batch_size is None


def test_docs_show_the_generated_megatron_table():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "bench/plan_targets.py", "--backend=megatron"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # every plan fits
    table = proc.stdout.strip()
    assert table.startswith(plan_targets.MEGATRON_HEADER) and table.count("\n") == 11
    doc = open(os.path.join(ROOT, "docs", "scaling.md")).read()
    assert table in doc, "docs/scaling.md: paste the output of `python bench/plan_targets.py --backend=megatron`"


def test_the_documented_one_node_layout_fits():
    """docs/megatron_training.md: the planner command before the hand-set one-node launch."""
    code, out = _cli(
        *doc_command(
            "docs/megatron_training.md", "python -m mugv_megatron.plan --config=configs/mugv_10b.py:video_720 --gpus=8"
        )[3:]
    )
    assert code == 0 and "fits" in out, out
    assert "47 GiB per GPU" in open(os.path.join(ROOT, "docs", "megatron_training.md")).read()
    assert round(float(out.split("total (torch allocator)")[1].split("GiB")[0])) == 47


def _torchrun_args(tmp_path, **env_vars):
    """The arguments launch/megatron_torchrun.sh gives torchrun (stubbed), for these variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TP_SIZE", "SP", "PP_SIZE", "CP_SIZE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", GPUS_PER_NODE="8", **env_vars)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "megatron_torchrun.sh"), "--config.seed=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_launch_script_keeps_the_configs_layout_unless_sizes_are_set(tmp_path):
    # Before: --tp=1 --nosp --pp=1 --cp=1 always, overriding the config's planned layout.
    args = _torchrun_args(tmp_path, CONFIG="configs/mugv_10b.py:video_720:h100x128")
    assert not [a for a in args if a.startswith(("--tp", "--sp", "--nosp", "--pp", "--cp"))], args
    assert "--config=configs/mugv_10b.py:video_720:h100x128" in args and args[-1] == "--config.seed=3"
    args = _torchrun_args(tmp_path, TP_SIZE="4", SP="1", CP_SIZE="2")
    assert {"--tp=4", "--sp", "--cp=2"} <= set(args) and not [a for a in args if a.startswith("--pp")]
    assert "--nosp" in _torchrun_args(tmp_path, SP="0")
