"""The planning benches: the candidates bench/plan_search.py tries, the table rows of
bench/plan_targets.py (and its reuse of search results), and bench/roofline_check.py."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import plan_search  # noqa: E402
import plan_targets  # noqa: E402

from mugv.config import get_config  # noqa: E402


def test_search_candidates_use_the_pods_fused_kernel():
    cands = plan_search.candidates(256, 256, 3456, 48, "splash", max_context=32, tensors=(1,), remats=("full",))
    by_context = {c["mesh"][3]: c["attention"] for c in cands}
    # Ulysses where 48 heads split over the context degree, the fused ring beyond.
    assert by_context == {1: "splash", 2: "splash+ulysses", 4: "splash+ulysses", 8: "splash+ulysses",
                          16: "splash+ulysses", 32: "splash+ring"}  # fmt: skip
    gpu = plan_search.candidates(64, 256, 3456, 48, "cudnn", tensors=(2,), remats=("save_qkv_attn", "full"))
    assert gpu[0]["attention"] == "cudnn" and gpu[0]["mesh"] == (1, 32, 2, 1)
    assert [c["remat"] for c in gpu[:2]] == ["save_qkv_attn", "full"]  # policy order within a layout
    assert all(c["mesh"][0] * c["mesh"][1] * c["micro"] * c["accum"] == 256 for c in gpu)
    model = get_config("10b")
    full = dict(mesh=(1, 128, 1, 1), attention="splash", remat="full", micro=1, accum=2)
    saved = dict(full, remat="save_qkv_attn")
    # What a save-list keeps raises the bound; the score block of the kernel is no N² term.
    assert plan_search.lower_bound(saved, model, 50402) > plan_search.lower_bound(full, model, 50402)
    assert plan_search.lower_bound(full, model, 50402) < 60 * 2**30


def _plan(**kw):
    r = dict(
        bucket=[14, 160, 90, 256],
        mesh=dict(data=1, fsdp=128, tensor=1, context=1),
        attention="splash",
        remat="full",
        micro_batch=1,
        grad_accum_steps=2,
        state_bytes=2**30,
        temp_bytes=50 * 2**30,
        total_bytes=52 * 2**30,
        hbm_bytes=95 * 2**30,
        fits=True,
        collective_bytes=300 * 2**30,
        remat_warning_count=0,
        step_seconds=151.2,
        mfu=0.254,
        wall_seconds=90,
        cpu_seconds=80,
    )
    r.update(kw)
    return r


def test_targets_rows_carry_the_roofline_and_the_compile_checks():
    line = plan_targets.row(["video_720", "sft"], "v5p-256", None, _plan())
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(plan_targets.HEADER.splitlines()[0].strip("|").split("|"))
    assert cells[:5] == ["video_720, sft", "v5p-256", "14×160×90 × 256", "(1, 128, 1, 1)", "splash, full"]
    assert cells[-4:] == ["300", "0", "151.2 / 25.4%", "90 / 80"]
    skip = plan_targets.row(["preference"], "v5p-256", "skip", {})
    assert skip.count("|") == line.count("|")


def test_targets_plan_every_lora_stage_on_every_small_slice():
    from configs import mugv_10b

    todo = plan_targets.programs(list(mugv_10b.LORA_STAGES), list(mugv_10b.LORA_PODS))
    assert sorted((names[0], pod) for names, pod, _ in todo) == sorted(
        (s, p) for s in mugv_10b.LORA_STAGES for p in mugv_10b.LORA_PODS
    )
    assert all(bucket is None for _, _, bucket in todo)  # no image buckets, nothing skipped


def test_the_lora_table_of_docs_scaling_is_the_planners_output():
    """docs/scaling.md "LoRA fine-tunes": every row is bench/plan_targets.py's row of a plan kept
    in bench/results/, and every kept plan fits with no involuntary rematerialization."""
    from configs import mugv_10b

    with open(os.path.join(ROOT, "bench", "results", "plan_lora_2026-12-07.jsonl")) as f:
        plans = [json.loads(line) for line in f]
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        doc = f.read()
    for r in plans:
        assert r["stages"][0] in mugv_10b.LORA_STAGES and r["fits"] and r["remat_warning_count"] == 0
        assert r["lora_rank"] == 64 and r["frozen_dtype"] == "bfloat16"
        # The plan is of the shipped layout.
        c = mugv_10b.get_config(f"{r['stages'][0]}:{r['pod']}")
        assert tuple(r["mesh"][a] for a in ("data", "fsdp", "tensor", "context")) == tuple(
            c.mesh.ici[a] for a in ("data", "fsdp", "tensor", "context")
        )
        assert (r["attention"], r["grad_accum_steps"]) == (c.attention, c.optim.grad_accum_steps)
        assert plan_targets.row(r["stages"], r["pod"], None, r) in doc


def test_targets_reuse_the_searched_plan_of_the_shipped_layout(tmp_path):
    from configs import mugv_10b

    c = mugv_10b.get_config("video_720:v5p-256")
    m = {a: int(c.mesh.ici[a]) for a in ("data", "fsdp", "tensor", "context")}
    shipped = _plan(mesh=m, attention=c.attention, remat=c.remat, grad_accum_steps=c.optim.grad_accum_steps)
    other = dict(shipped, attention="xla+ring")
    path = tmp_path / "plans.jsonl"
    path.write_text(
        "\n".join(json.dumps(dict(r, stage="video_720", pod="v5p-256", bucket_index=None)) for r in (other, shipped))
    )
    found = plan_targets._planned(str(path))
    assert found[plan_targets._layout_key("video_720", "v5p-256", None)]["attention"] == c.attention


def test_roofline_check_prints_the_prediction_beside_the_measurement():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "roofline_check.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    predicted = next(line for line in lines if line.startswith("predicted"))
    measured = next(line for line in lines if line.startswith("measured ("))
    assert "2.989 s, MFU 21.2%" in measured and "matmul" in predicted and "attention" in predicted
    ratio = float(lines[-1].split(": ")[1])
    seconds = float(predicted.split(" = ")[1].split(" s")[0])
    assert ratio == pytest.approx(2.989 / seconds, abs=0.01) and 1 < ratio < 3


def test_search_scales_earlier_plans_on_the_pod(tmp_path):
    """A plan of one stage tells the next stages' search what a local token costs on that pod."""
    cand = dict(mesh=[1, 128, 1, 1], attention="splash", remat="full", micro=6, accum=3)
    plan = _plan(pod="v5p-256", candidate=cand, tokens=6442, params_bytes=2**30, temp_bytes=78 * 2**30)
    other = dict(plan, candidate=dict(cand, mesh=[1, 64, 1, 2], attention="splash+ulysses"), temp_bytes=40 * 2**30)
    path = tmp_path / "plans.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (plan, other, dict(plan, pod="h100x64"))) + "\n")
    prior = plan_search._prior_per_token(str(path), "v5p-256")
    # activations: temporaries less the gradients and the accumulator (2 × params), per local token;
    # the smallest over the pod's plans with this policy and kernel (any mesh, any context mode)
    assert prior == {("full", "splash"): pytest.approx((40 - 2) * 2**30 / (6 * 3221))}


def test_targets_reuse_their_own_results_and_a_later_file_wins(tmp_path):
    """The table is regenerated from plan_targets' own --results (rows naming their stages, the
    image bucket by its --bucket flag); a later file's plan of the same layout replaces an earlier one."""
    from configs import mugv_10b

    c = mugv_10b.get_config("video_360_2s:v5p-256")
    m = {a: int(c.mesh.ici[a]) for a in ("data", "fsdp", "tensor", "context")}
    layout = dict(mesh=m, attention=c.attention, remat=c.remat, grad_accum_steps=c.optim.grad_accum_steps)
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    # a search plan (stage) the targets run recorded for both stages it serves (stages)
    video = dict(
        _plan(**layout), stage="video_360_2s", stages=["video_360_2s", "image_360"], pod="v5p-256", command="x"
    )
    images = dict(video, stages=["image_360"], command="python -m mugv_jax.plan --bucket=3", step_seconds=5.0)
    old.write_text("\n".join(json.dumps(r) for r in (video, images)) + "\n")
    new.write_text(json.dumps(dict(video, step_seconds=42.0)) + "\n")
    found = plan_targets._planned(f"{old},{new}")
    key = plan_targets._layout_key
    assert found[key("image_360", "v5p-256", None)]["step_seconds"] == 42.0  # the later file's
    assert found[key("video_360_2s", "v5p-256", None)]["step_seconds"] == 42.0
    assert found[key("image_360", "v5p-256", 3)]["step_seconds"] == 5.0
