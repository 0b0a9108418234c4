"""Find the layout of one 10B stage on one pod with the planner.

    python bench/plan_search.py --stage=video_720 --pod=v6e-256 [--bucket=I] [--max_plans=6] \
        [--remats=full] [--tensors=1,2,4]

Candidates: context degree c = 1, 2, 4, … with the pod's fused kernel (splash on TPU, cuDNN on
GPU; docs/scaling.md): Ulysses when the heads per tensor shard divide by c, else the fused ring;
fsdp as wide as the hidden size and the data-parallel width allow, every micro-batch per
data-parallel rank that divides the stage's batch, and each remat policy of --remats (e.g.
`save_qkv_attn,full`: the named save-list first, faster when it fits); tensor 1, then 2 and 4
(hidden 3456 is narrow for tensor parallelism: only when nothing fits without it). They are tried
in order of expected speed: no tensor parallelism first, then the lowest context degree (context
parallelism adds communication), then the largest micro-batch (each accumulation step
all-gathers the FSDP parameters again), then the policy order given. A candidate is skipped
without compiling when a lower bound on its memory (state, gradients, float32 layer inputs, what
the policy saves, the kernels' score blocks) already exceeds 90% of HBM, or when a measured plan
of the same mesh and policy with a larger micro-batch, scaled down, still would, or (with
--results) when the state plus the smallest activation bytes per local token of the earlier plans
with this policy and kernel on this pod (other stages, other meshes) would. The first plan
within 90% of HBM wins; the script prints every plan it ran (with its roofline step time) and
the LAYOUTS line for configs/mugv_10b.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_common import GiB, machine, mugv_10b, overrides, run_plan  # noqa: E402

from mugv import roofline  # noqa: E402
from mugv.config import get_config as model_config  # noqa: E402
from mugv.geometry import num_tokens  # noqa: E402

HEADROOM = 0.10
KERNEL = {"tpu": "splash", "gpu": "cudnn"}
BLOCK = 512  # keys per block of the fused kernels' stand-in (mugv_jax/parallel/blockwise.py)
# bytes per token and layer that a remat policy keeps beyond the float32 layer input (bf16 qkv
# projection, bf16 attention output and its float32 log-sum-exp per head)
SAVED_PER_TOKEN = {"qkv_proj": lambda c, h: 3 * c * 2, "attn_out": lambda c, h: c * 2 + h * 4}
POLICY_SAVES = {
    "save_qkv_proj": ("qkv_proj",),
    "save_attn_out": ("attn_out",),
    "save_qkv_attn": ("qkv_proj", "attn_out"),
}


def attention_for(kernel: str, heads: int, tensor: int, context: int) -> str:
    if context == 1:
        return kernel
    return f"{kernel}+ulysses" if (heads // tensor) % context == 0 else f"{kernel}+ring"


def candidates(devices, batch, hidden, heads, kernel, max_context=32, tensors=(1, 2, 4), remats=("full",)):
    out = []
    for t in tensors:
        c = 1
        while c * t <= devices and c <= max_context:
            dp = devices // (c * t)
            if devices % (c * t) == 0 and batch % dp == 0:
                fsdp = max(f for f in range(1, dp + 1) if dp % f == 0 and hidden % f == 0)
                per_rank = batch // dp
                for micro in sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True):
                    for remat in remats:
                        out.append(
                            dict(
                                mesh=(dp // fsdp, fsdp, t, c),
                                attention=attention_for(kernel, heads, t, c),
                                remat=remat,
                                micro=micro,
                                accum=per_rank // micro,
                            )
                        )
            c *= 2
    return out


def lower_bound(cand: dict, model, tokens: int) -> float:
    """Bytes per device that the candidate needs at least."""
    d, f, t, c = cand["mesh"]
    hidden, heads = model.hidden_size, model.num_heads
    params = model.depth * 16 * hidden**2 * 4  # float32, blocks only
    sharded = params * (5 + (cand["accum"] > 1)) / (f * t)  # params, Adam moments, EMA, grads (+ accumulator)
    local = math.ceil(tokens / c)
    per_token = hidden * 4 + sum(SAVED_PER_TOKEN[n](hidden, heads) for n in POLICY_SAVES.get(cand["remat"], ()))
    layer_inputs = model.depth * cand["micro"] * local * per_token
    # one score block of the kernel's backward (p, dp, ds in float32) for this device's heads
    ulysses = "ulysses" in cand["attention"]
    queries, kv_heads = (tokens, heads // t // c) if ulysses else (local, heads // t)
    scores = 3 * cand["micro"] * kv_heads * queries * min(BLOCK, tokens) * 4
    return sharded + layer_inputs + scores


def _prior_per_token(path: str, pod: str) -> dict:
    """{(remat, kernel): activation bytes per local token} from earlier plans on `pod` in a
    results file (other stages, other meshes): the smallest figure, so that a candidate is skipped
    only when even that estimate does not fit."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "error" in r or r.get("pod") != pod:
                continue
            cand = r["candidate"]
            grads = r["params_bytes"] * (1 + (cand["accum"] > 1))
            act = max(r["temp_bytes"] - grads, 0)
            tokens = math.ceil(r["tokens"] / cand["mesh"][3]) * cand["micro"]
            key = (cand["remat"], cand["attention"].partition("+")[0])
            out[key] = min(out.get(key, math.inf), act / tokens)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=list(mugv_10b.STAGES))
    ap.add_argument("--pod", required=True, choices=list(mugv_10b.PODS))
    ap.add_argument("--bucket", type=int, default=None, help="planner --bucket (default: most tokens per step)")
    ap.add_argument("--max_plans", type=int, default=6, help="stop after this many compiled plans")
    ap.add_argument("--max_context", type=int, default=32)
    ap.add_argument("--tensors", default="1,2,4", help="tensor-parallel degrees to try, in this order")
    ap.add_argument("--remats", default="full", help="remat policies to try per layout, in this order")
    ap.add_argument("--log_dir", default=None, help="keep every planner output here")
    ap.add_argument("--results", default=None, help="append each plan's JSON summary to this .jsonl")
    args = ap.parse_args()

    pod = mugv_10b.PODS[args.pod]
    config = mugv_10b.get_config(f"{args.stage}:{args.pod}")
    model = model_config("10b")
    buckets = [tuple(b) for b in config.data.buckets] + [tuple(b) for b in config.data.mix.image_buckets]
    bucket = buckets[args.bucket if args.bucket is not None else 0]
    tokens = num_tokens(bucket[:3], model)
    device = roofline.DEVICES[pod["kind"]]
    target = (1 - HEADROOM) * device.hbm
    print(
        f"# {args.stage} on {args.pod} ({pod['devices']} × {pod['kind']}), bucket {bucket}, {tokens} tokens "
        f"per sample; target ≤ {target / GiB:.1f} GiB; {machine()}",
        flush=True,
    )
    measured = {}  # (mesh, remat) → (micro, total, act bytes) of the plans that did not fit
    per_token = _prior_per_token(args.results, args.pod) if args.results else {}
    ran = 0
    tensors = tuple(int(t) for t in args.tensors.split(","))
    remats = tuple(args.remats.split(","))
    kernel = KERNEL[device.platform]
    for cand in candidates(
        pod["devices"], bucket[3], model.hidden_size, model.num_heads, kernel, args.max_context, tensors, remats
    ):
        lb = lower_bound(cand, model, tokens)
        lb_state = lower_bound(dict(cand, micro=0), model, tokens)  # the sharded state alone
        tag = (
            f"mesh {cand['mesh']} {cand['attention']:14s} {cand['remat']:13s} micro {cand['micro']:3d} × "
            f"accum {cand['accum']:3d}"
        )
        if lb > target:
            print(f"skip {tag}: lower bound {lb / GiB:.1f} GiB", flush=True)
            continue
        key = (cand["mesh"], cand["remat"])
        prior = per_token.get((cand["remat"], cand["attention"].partition("+")[0]))
        if prior and key not in measured:
            est = lb_state + prior * cand["micro"] * math.ceil(tokens / cand["mesh"][3])
            if est > target:
                print(f"skip {tag}: ≈ {est / GiB:.1f} GiB scaled from earlier plans on this pod", flush=True)
                continue
        if key in measured:
            micro0, total0, act0 = measured[key]
            est = total0 - act0 * (1 - cand["micro"] / micro0)
            if est > target:
                print(f"skip {tag}: ≈ {est / GiB:.1f} GiB scaled from micro {micro0}", flush=True)
                continue
        if ran >= args.max_plans:
            print(f"stop: {args.max_plans} plans compiled without a fit", flush=True)
            return 1
        ran += 1
        r = run_plan(args.stage, args.pod, overrides(cand), bucket=args.bucket, log_dir=args.log_dir)
        r.update(candidate=cand, stage=args.stage, pod=args.pod, bucket_index=args.bucket)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps({k: v for k, v in r.items() if k != "report"}) + "\n")
        if "error" in r:
            print(f"plan {tag}: planner failed: {r['error']}", flush=True)
            continue
        total = r["total_bytes"]
        print(
            f"plan {tag}: {total / GiB:.1f} GiB (state {r['state_bytes'] / GiB:.1f}, temps "
            f"{r['temp_bytes'] / GiB:.1f}); predicted {r['step_seconds']:.1f} s/step, MFU {r['mfu']:.1%}; "
            f"{r['wall_seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU",
            flush=True,
        )
        if total <= target:
            d, f, t, c = cand["mesh"]
            clip = mugv_10b.STAGES[args.stage][1]["clip"]
            print(
                f"fits: LAYOUTS[({clip!r}, {args.pod!r})] = (({d}, {f}, {t}, {c}), {cand['attention']!r}, "
                f"{cand['remat']!r}, {cand['micro']})",
                flush=True,
            )
            return 0
        grads = r["params_bytes"] * (1 + (cand["accum"] > 1))
        measured[key] = (cand["micro"], total, max(r["temp_bytes"] - grads, 0))
    print("no candidate fits", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
