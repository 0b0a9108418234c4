"""Plan every 10B stage on every pod it is laid out for and print the table (docs/scaling.md).

    python bench/plan_targets.py [--stages=video_720,sft] [--pods=v5p-256,h100x64] [--results=plans.jsonl]
    python bench/plan_targets.py --backend=megatron [--search]
    python bench/plan_targets.py --lora [--stages=lora_720] [--pods=h100x8] [--results=plans.jsonl]

`--backend=megatron` prints the Megatron layouts of the H100 pods (configs/mugv_10b.py
MEGATRON_LAYOUTS) with mugv_megatron.plan's analytic per-GPU memory, in a second or two: the table
of docs/scaling.md "Megatron layouts on H100" is this output verbatim (a test compares them).
`--search` prints instead, per clip and pod, the fastest layouts the estimate finds that fit, and
the MEGATRON_LAYOUTS lines of the first.

Each plan is `python -m mugv_jax.plan --config=configs/mugv_10b.py:<stage>:<pod>` in a fresh
process (the fake device count is fixed when jax starts), run one after another: a 256-device
plan of the 10B step takes 30–60 s of CPU time. Stages whose train step is the same program (same
buckets and layout: image_360's video bucket = video_360_2s, sft = video_720) are planned once;
image_360's image bucket is planned as its own row. `--lora` plans the LoRA fine-tunes instead
(LORA_STAGES on the small slices of LORA_PODS: the frozen bfloat16 base, the float32 adapters;
docs/scaling.md "LoRA fine-tunes"). The preference stage is listed but not
planned: the planner compiles the pretraining step, not the DPO/KTO step. Exit status 1 if any
plan does not fit or carries an involuntary full rematerialization.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_common import GiB, machine, mugv_10b, run_plan  # noqa: E402


def programs(stages, pods):
    """[(stage names, pod, bucket index or None)], one per distinct compiled step."""
    out, seen = [], {}
    for pod in pods:
        for stage in stages:
            c = mugv_10b.get_config(f"{stage}:{pod}")
            if c.mode != "pretrain":
                out.append(([stage], pod, "skip"))
                continue
            rows = [None] + ([len(c.data.buckets)] if len(c.data.mix.image_buckets) else [])
            for bucket in rows:
                shapes = tuple(map(tuple, c.data.buckets)) if bucket is None else tuple(c.data.mix.image_buckets[0])
                key = (pod, shapes, tuple(c.mesh.ici.items()), c.attention, c.remat, c.optim.grad_accum_steps)
                if key in seen:
                    seen[key][0].append(stage)
                    continue
                entry = ([stage], pod, bucket)
                seen[key] = entry
                out.append(entry)
    return out


def _layout_key(stage, pod, bucket):
    """What makes a plan one of the shipped layout's: stage, pod, bucket and the layout fields."""
    c = mugv_10b.get_config(f"{stage}:{pod}")
    mesh = tuple(int(c.mesh.ici[a]) for a in ("data", "fsdp", "tensor", "context"))
    return (stage, pod, bucket, mesh, c.attention, c.remat, c.optim.grad_accum_steps)


def _bucket_index(r):
    if "bucket_index" in r:  # plan_search.py
        return r["bucket_index"]
    flag = [a for a in r.get("command", "").split() if a.startswith("--bucket=")]  # plan_targets.py
    return int(flag[0].split("=", 1)[1]) if flag else None


def _planned(paths):
    """{layout key: plan} of the successful plans in .jsonl files of bench/plan_search.py or of
    this script (`--results`), comma-separated; a later plan of the same layout wins."""
    out = {}
    for path in paths.split(","):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "error" in r or "mesh" not in r:
                    continue
                m = r["mesh"]
                mesh = (m["data"], m["fsdp"], m["tensor"], m["context"])
                for stage in {r.get("stage"), *r.get("stages", [])} - {None}:  # a row serves its stages
                    key = (stage, r["pod"], _bucket_index(r), mesh, r["attention"], r["remat"], r["grad_accum_steps"])
                    out[key] = r
    return out


def row(names, pod, bucket, r) -> str:
    label = ", ".join(names) + (" (images)" if bucket not in (None, "skip") else "")
    empty = " |" * (len(HEADER.splitlines()[1].split("|")) - 5)
    if bucket == "skip":
        return f"| {label} | {pod} | preference step: not planned |{empty}"
    if "error" in r:
        return f"| {label} | {pod} | planner failed: {r['error'][:120]} |{empty}"
    f, h, w, b = r["bucket"]
    mesh = r["mesh"]
    free = 1 - r["total_bytes"] / r["hbm_bytes"]
    verdict = f"fits, {free:.0%} free" if r["fits"] else "DOES NOT FIT"
    return (
        f"| {label} | {pod} | {f}×{h}×{w} × {b} | ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}, "
        f"{mesh['context']}) | {r['attention']}, {r['remat']} | {r['micro_batch']} × {r['grad_accum_steps']} | "
        f"{r['state_bytes'] / GiB:.1f} | {r['temp_bytes'] / GiB:.1f} | **{r['total_bytes'] / GiB:.1f}** / "
        f"{r['hbm_bytes'] / GiB:.0f} ({verdict}) | {r['collective_bytes'] / GiB:.0f} | {r['remat_warning_count']} | "
        f"{r['step_seconds']:.1f} / {r['mfu']:.1%} | {r['wall_seconds']:.0f} / {r['cpu_seconds']:.0f} |"
    )


HEADER = (
    "| stages | pod | bucket (latent f×h×w) × global batch | mesh (data, fsdp, tensor, context) | "
    "attention, remat | micro-batch per rank × accumulation | state GiB | temporaries GiB | "
    "total GiB / HBM | collectives GiB sent per device | involuntary remats | predicted step s / MFU | "
    "compile wall / CPU s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


MEGATRON_HEADER = (
    "| stages | pod | bucket (latent f×h×w) × global batch | TP, SP, PP, CP | recompute | "
    "micro-batch × DP × accumulation | state GiB | activations GiB | total GiB / GPU | largest part | "
    "step s at 40% HFU |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def megatron_pods(pods):
    return [p for p in pods if any(pod == p for _, pod in mugv_10b.MEGATRON_LAYOUTS)]


def megatron_rows(stages, pods) -> tuple[list[str], bool]:
    """The Megatron table's rows (one per distinct plan) and whether every plan fits."""
    from mugv_megatron import plan as mplan

    rows, seen, ok = [], {}, True
    for pod in megatron_pods(pods):
        for stage in stages:
            c = mugv_10b.get_config(f"{stage}:{pod}")
            if c.mode != "pretrain":
                rows.append([[stage], f"| {stage} | {pod} | preference step: not planned | | | | | | | | |"])
                continue
            p = mplan.plan_config(c, int(c.target.devices), "h100")
            w, lay = p.worst, p.layout
            key = (pod, w.bucket, lay, w.accumulation)
            if key in seen:
                seen[key][0].append(stage)
                continue
            ok &= p.fits
            e = w.estimate
            f, h, wd, batch = w.bucket
            part, size = e.dominant(1)[0]
            verdict = "fits" if p.fits else "DOES NOT FIT"
            line = (
                f"| {{names}} | {pod} | {f}×{h}×{wd} × {batch} | {lay.tp}, {'on' if lay.sp else 'off'}, {lay.pp}, "
                f"{lay.cp} | {lay.recompute} | {w.micro_batch} × {p.data_parallel} × {w.accumulation} | "
                f"{e.state_total / GiB:.1f} | {e.activation_total / GiB:.1f} | **{e.total / GiB:.1f}** / "
                f"{mplan.DEVICES['h100']['memory'] / GiB:.1f} ({verdict}) | {part} ({size / GiB:.1f}) | "
                f"{p.step_seconds(0.4):.1f} |"
            )
            seen[key] = [[stage], line]
            rows.append(seen[key])
    return [line.replace("{names}", ", ".join(names)) for names, line in rows], ok


def megatron_search(stages, pods) -> None:
    from mugv.run.config import model_config_from
    from mugv_megatron import plan as mplan

    done = set()
    for pod in megatron_pods(pods):
        for stage in stages:
            c = mugv_10b.get_config(f"{stage}:{pod}")
            clip = mugv_10b.STAGES[stage][1]["clip"]
            if c.mode != "pretrain" or (clip, pod) in done:
                continue
            done.add((clip, pod))
            found = mplan.search(
                model_config_from(c),
                mplan.run_buckets(c),
                gpus=int(c.target.devices),
                kind="h100",
                text_len=int(c.data.text_len),
                limit=3,
            )
            for q in found:
                print(f"# {stage} on {pod}: {q.layout.describe()}: {q.total / GiB:.1f} GiB")
            if found:
                lay = found[0].layout
                row = (lay.tp, lay.sp, lay.pp, lay.cp, lay.micro_batch, lay.recompute)
                print(f'    ("{clip}", "{pod}"): {row!r},'.replace("'", '"'))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=None, help="default: every stage (with --lora, every LoRA stage)")
    ap.add_argument("--pods", default=None, help="default: every pod (with --lora, the LoRA stages' pods)")
    ap.add_argument("--lora", action="store_true", help="plan the LoRA stages on their small slices")
    ap.add_argument("--backend", choices=("jax", "megatron"), default="jax")
    ap.add_argument("--search", action="store_true", help="megatron: search the layouts instead of the table")
    ap.add_argument("--results", default=None, help="also append each plan's JSON summary to this .jsonl")
    ap.add_argument("--log_dir", default=None, help="keep every planner output here")
    ap.add_argument(
        "--reuse",
        default=None,
        help="comma-separated .jsonl files of plans (bench/plan_search.py or this script's --results): shipped "
        "layouts found there are not re-planned (a later file's plan wins)",
    )
    args = ap.parse_args()
    known_stages = mugv_10b.LORA_STAGES if args.lora else mugv_10b.STAGES
    known_pods = mugv_10b.LORA_PODS if args.lora else mugv_10b.PODS
    stages = args.stages.split(",") if args.stages else list(known_stages)
    pods = args.pods.split(",") if args.pods else list(known_pods)
    for s in stages:
        if s not in known_stages:
            ap.error(
                f"--stages: unknown stage {s!r}; choose from {list(known_stages)}" + (" (with --lora)" * args.lora)
            )
    for p in pods:
        if p not in known_pods:
            ap.error(f"--pods: unknown pod {p!r}; choose from {list(known_pods)}" + (" (with --lora)" * args.lora))
    if args.lora and args.backend == "megatron":
        ap.error("--lora plans the JAX step (the Megatron planner has no LoRA estimate yet)")
    if args.backend == "megatron":
        if args.search:
            megatron_search(stages, pods)
            return 0
        lines, ok = megatron_rows(stages, pods)
        print(MEGATRON_HEADER + "\n" + "\n".join(lines))
        return 0 if ok else 1
    print(
        f"{datetime.date.today().isoformat()}, {machine()}; python -m mugv_jax.plan per row, one at a time", flush=True
    )
    todo = programs(stages, pods)
    planned = _planned(args.reuse) if args.reuse else {}
    lines, ok = [], True
    for names, pod, bucket in todo:
        r, reused = {}, False
        if bucket != "skip":
            r = planned.get(_layout_key(names[0], pod, bucket))
            reused = r is not None
            r = r or run_plan(names[0], pod, bucket=bucket, log_dir=args.log_dir)
        if bucket != "skip":
            ok &= bool(r.get("fits")) and r.get("remat_warning_count") == 0
            # a plan read from --results itself is there already
            if args.results and not (reused and args.results in (args.reuse or "").split(",")):
                with open(args.results, "a") as f:
                    f.write(
                        json.dumps({"stages": names, "pod": pod, **{k: v for k, v in r.items() if k != "report"}})
                        + "\n"
                    )
        lines.append(row(names, pod, bucket, r))
        print(lines[-1], flush=True)
    print("\n" + HEADER + "\n" + "\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
