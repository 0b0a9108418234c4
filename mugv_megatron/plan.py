"""Plan a Megatron run on GPUs: per-GPU memory of a config's layout, the verdict, what to change.

    python -m mugv_megatron.plan --config=configs/mugv_10b.py:video_720:h100x128 [--gpus=N] [--kind=h100]
        [--config.megatron.tp=4 --config.megatron.recompute=full ...] [--json=plan.json]

The layout is the config's `megatron` section (tp, sp, pp, cp, recompute, micro_batch_size,
local_attention / use_te, distributed_optimizer, params_dtype) on `--gpus` GPUs (default: the pod
the config was laid out for, `config.target`). Every batch shape of the run is estimated with
`mugv_megatron.memory` (analytic: nothing is built, no torch), and the largest is reported part
by part against the GPU's memory. Exit status 0 when it fits; 1 otherwise, after the layouts that
would fit, fastest first; 2 when the global batch does not split into micro-batch × data
parallel × accumulation (the message names the config keys).

A separate planner from `python -m mugv_jax.plan`: that one compiles the JAX step with XLA over
fake devices; Megatron's memory comes from torch's autograd and allocator, which only an analytic
model (checked against measured saved tensors and a GPU peak) can predict without a GPU. It also
keeps the Megatron backend free of JAX.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from mugv import flops as flops_lib
from mugv import geometry
from mugv.config import DiTConfig
from mugv.run.config import as_run_config
from mugv_megatron import memory

MiB, GiB = 1024**2, 1024**3

# Memory of one GPU as the driver reports it (nvidia-smi), and bf16 dense peak FLOP/s.
DEVICES = {
    "h100": dict(memory=81_559 * MiB, peak=989e12),  # H100 SXM 80 GB
    "h200": dict(memory=143_771 * MiB, peak=989e12),  # measured on the lent H200 (docs/benchmarks.md)
}
# Kept free of the estimate: 10% for allocator fragmentation and what the model leaves out, and
# what lives outside torch's allocator (CUDA context, NCCL communicators, cuBLAS/cuDNN workspaces).
HEADROOM = 0.10
OUTSIDE_ALLOCATOR = 2 * GiB
TENSOR_PARALLEL = (1, 2, 4, 8)  # within one 8-GPU node (NVLink)
GPUS_PER_NODE = 8


def budget(kind: str) -> float:
    """Bytes the estimate may reach on one GPU of `kind`."""
    return DEVICES[kind]["memory"] * (1 - HEADROOM) - OUTSIDE_ALLOCATOR


# --- the run's shapes and batch split -------------------------------------------------------------


def run_buckets(config) -> list[tuple[int, int, int, int]]:
    """Every (latent frames, height, width, global batch) a run of `config` steps with: the video
    buckets, then the mixed-in image buckets; with the shard loader every bucket's batch is
    data.batch_size."""
    d = as_run_config(config).data
    buckets = list(d.buckets) + (list(d.mix.image_buckets) if d.mix.on else [])
    if d.source == "shards":
        buckets = [(*b[:3], d.batch_size) for b in buckets]
    return buckets


def batch_split(global_batch: int, data_parallel: int, micro_batch_size: int | None, grad_accum_steps: int):
    """(micro-batch per data-parallel rank, accumulation steps) with micro × DP × accumulation =
    global batch; ValueError naming the config keys when it does not divide."""
    if global_batch % data_parallel:
        raise ValueError(
            f"global batch {global_batch} (config.data) is not divisible by the data-parallel size "
            f"{data_parallel} = GPUs / (config.megatron.tp × cp × pp)"
        )
    per_rank = global_batch // data_parallel
    if micro_batch_size is None:
        if per_rank % grad_accum_steps:
            raise ValueError(
                f"{per_rank} samples per data-parallel rank (global batch {global_batch} / DP {data_parallel}) "
                f"do not split into config.optim.grad_accum_steps={grad_accum_steps} micro-batches: set "
                f"config.megatron.micro_batch_size to a divisor of {per_rank}"
            )
        return per_rank // grad_accum_steps, grad_accum_steps
    if per_rank % micro_batch_size:
        raise ValueError(
            f"{per_rank} samples per data-parallel rank (global batch {global_batch} / DP {data_parallel}) "
            f"are not a multiple of config.megatron.micro_batch_size={micro_batch_size}"
        )
    return micro_batch_size, per_rank // micro_batch_size


def data_parallel_size(gpus: int, tp: int, cp: int, pp: int) -> int:
    if gpus % (tp * cp * pp):
        raise ValueError(
            f"{gpus} GPUs are not divisible by config.megatron.tp={tp} × cp={cp} × pp={pp} (= {tp * cp * pp})"
        )
    return gpus // (tp * cp * pp)


def check_layout(model: DiTConfig, tp: int, pp: int) -> None:
    if model.num_heads % tp or model.mlp_hidden_size % tp:
        raise ValueError(f"config.megatron.tp={tp} must divide the {model.num_heads} heads and the MLP width")
    if model.depth % pp:
        raise ValueError(f"config.megatron.pp={pp} does not divide the model's {model.depth} layers")


# --- one plan -----------------------------------------------------------------------------------


@dataclasses.dataclass
class BucketPlan:
    bucket: tuple[int, int, int, int]
    micro_batch: int
    accumulation: int
    estimate: memory.Estimate
    step_flops: float  # hardware FLOPs of one step, whole cluster (recompute included)


@dataclasses.dataclass
class Plan:
    model: DiTConfig
    layout: memory.Layout  # micro_batch of the largest bucket
    gpus: int
    kind: str
    data_parallel: int
    distributed_optimizer: bool
    params_dtype: str
    buckets: list[BucketPlan]

    @property
    def worst(self) -> BucketPlan:
        return max(self.buckets, key=lambda b: b.estimate.total)

    @property
    def total(self) -> float:
        return self.worst.estimate.total

    @property
    def fits(self) -> bool:
        return self.total <= budget(self.kind)

    def step_seconds(self, hfu: float) -> float:
        """The costliest bucket's step when the GPUs run its hardware FLOPs (recompute counted) at
        `hfu` of their peak."""
        return max(b.step_flops for b in self.buckets) / (self.gpus * DEVICES[self.kind]["peak"] * hfu)


def plan(
    model: DiTConfig,
    buckets: list[tuple[int, int, int, int]],
    lay: memory.Layout,
    *,
    gpus: int,
    kind: str = "h100",
    text_len: int,
    micro_batch_size: int | None,
    grad_accum_steps: int = 1,
    distributed_optimizer: bool = True,
    params_dtype: str = "bfloat16",
    compute_dtype: str = "bfloat16",
) -> Plan:
    """Estimate every bucket under `lay` (its micro_batch is replaced by each bucket's split)."""
    if kind not in DEVICES:
        raise ValueError(f"GPU kind {kind!r}: choose from {sorted(DEVICES)}")
    check_layout(model, lay.tp, lay.pp)
    dp = data_parallel_size(gpus, lay.tp, lay.cp, lay.pp)
    dtypes = memory.dtypes_for(compute_dtype, params_dtype)
    state = memory.state_bytes(distributed_optimizer, params_dtype)
    out = []
    for f, h, w, batch in buckets:
        micro, accum = batch_split(batch, dp, micro_batch_size, grad_accum_steps)
        bl = dataclasses.replace(lay, micro_batch=micro)
        sample = memory.Sample(geometry.num_tokens((f, h, w), model), text_len, f * h * w)
        e = memory.estimate(model, sample, bl, data_parallel=dp, micro_batches=accum, dtypes=dtypes, state=state)
        video = geometry.num_video_tokens((f, h, w), model)
        hw = flops_lib.hardware_step_flops(model, batch, video, text_len, lay.recompute).train
        out.append(BucketPlan((f, h, w, batch), micro, accum, e, hw))
    worst = max(out, key=lambda b: b.estimate.total)
    return Plan(
        model=model,
        layout=dataclasses.replace(lay, micro_batch=worst.micro_batch),
        gpus=gpus,
        kind=kind,
        data_parallel=dp,
        distributed_optimizer=distributed_optimizer,
        params_dtype=params_dtype,
        buckets=out,
    )


# --- the fastest layouts that fit -----------------------------------------------------------------


def candidates(model: DiTConfig, gpus: int, batch: int, *, max_micro: int = 4) -> list[memory.Layout]:
    """Layouts in order of expected speed (a rule, not a measurement): fewer recomputed FLOPs first
    (none, then full: with the fused attention `selective` keeps as much as `none`); then fewer
    model-parallel GPUs (each adds communication, PP a bubble); at equal count TP (NVLink inside a
    node) before CP before PP; then the largest micro-batch (fewer, larger kernels). TP and TP × CP
    stay inside a node; SP is on whenever TP > 1 (it only removes the replicated activations)."""
    out = []
    for recompute in ("none", "full"):
        group = []
        for tp in TENSOR_PARALLEL:
            if model.num_heads % tp or model.mlp_hidden_size % tp:
                continue
            for cp in (1, 2, 4, 8):
                if tp * cp > GPUS_PER_NODE:
                    continue
                for pp in (p for p in (1, 2, 4, 7, 8) if model.depth % p == 0):
                    if gpus % (tp * cp * pp):
                        continue
                    dp = gpus // (tp * cp * pp)
                    if batch % dp:
                        continue
                    per_rank = batch // dp
                    for micro in (m for m in range(min(max_micro, per_rank), 0, -1) if per_rank % m == 0):
                        group.append(memory.Layout(tp, tp > 1, pp, cp, micro, recompute, "sdpa"))
        group.sort(key=lambda lay: (lay.model_parallel, lay.pp, lay.cp, lay.tp, -lay.micro_batch))
        out += group
    return out


def search(model: DiTConfig, buckets, *, gpus: int, kind: str, text_len: int, limit: int = 1, **kw) -> list[Plan]:
    """The first `limit` candidates (fastest first) whose every bucket fits `kind`."""
    batch = max(b[3] for b in buckets)
    found = []
    for lay in candidates(model, gpus, batch):
        try:
            p = plan(
                model, buckets, lay, gpus=gpus, kind=kind, text_len=text_len, micro_batch_size=lay.micro_batch, **kw
            )
        except ValueError:
            continue
        if p.fits:
            found.append(p)
            if len(found) == limit:
                break
    return found


# --- the config's plan, the report --------------------------------------------------------------


def layout_of(config) -> memory.Layout:
    """The Megatron layout a config asks for (config.megatron; mugv.training.MegatronOptions)."""
    m = as_run_config(config).megatron
    attention = "te" if m.use_te else m.local_attention
    return memory.Layout(m.tp, m.sp, m.pp, m.cp, m.micro_batch_size or 1, m.recompute, attention)


def plan_config(config, gpus: int, kind: str) -> Plan:
    run = as_run_config(config)
    m, compute = run.megatron, run.compute_dtype
    params = m.params_dtype or ("bfloat16" if compute == "bfloat16" and m.distributed_optimizer else "float32")
    return plan(
        run.model_config,
        run_buckets(run),
        layout_of(run),
        gpus=gpus,
        kind=kind,
        text_len=run.data.text_len,
        micro_batch_size=m.micro_batch_size,
        grad_accum_steps=run.optim.grad_accum_steps,
        distributed_optimizer=m.distributed_optimizer,
        params_dtype=params,
        compute_dtype=compute,
    )


def overrides(lay: memory.Layout) -> str:
    return (
        f"--config.megatron.tp={lay.tp} --config.megatron.sp={str(lay.sp).lower()} --config.megatron.pp={lay.pp} "
        f"--config.megatron.cp={lay.cp} --config.megatron.micro_batch_size={lay.micro_batch} "
        f"--config.megatron.recompute={lay.recompute}"
    )


def report(p: Plan, hfu: float = 0.4) -> str:
    g = lambda b: f"{b / GiB:7.2f} GiB"  # noqa: E731
    w = p.worst
    e = w.estimate
    cap, ok = DEVICES[p.kind]["memory"], budget(p.kind)
    lines = [
        f"{p.gpus} × {p.kind} ({cap / GiB:.1f} GiB each): {p.layout.describe()}; data parallel {p.data_parallel}",
        f"state: {memory.state_bytes(p.distributed_optimizer, p.params_dtype).what}",
        "buckets (latent f×h×w × global batch → micro-batch × DP × accumulation: GiB per GPU):",
    ]
    for b in p.buckets:
        f, h, wd, batch = b.bucket
        lines.append(
            f"  {f}×{h}×{wd} × {batch} → {b.micro_batch} × {p.data_parallel} × {b.accumulation}: "
            f"{b.estimate.total / GiB:.1f}"
        )
    where = f" (pipeline stage {e.stage} of {p.layout.pp})" if p.layout.pp > 1 else ""
    lines.append(f"per GPU at the peak of the largest bucket{where}, {e.parameters / 1e9:.2f} B parameters on it:")
    for k, v in {**e.state, **e.activations}.items():
        lines.append(f"  {k:44s} {g(v)}")
    free = 1 - (e.total + OUTSIDE_ALLOCATOR) / cap
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(
        f"  {'total (torch allocator)':44s} {g(e.total)}   + {OUTSIDE_ALLOCATOR / GiB:.0f} GiB outside it, of "
        f"{cap / GiB:.1f} GiB: {verdict} ({free:.0%} free; the limit keeps {HEADROOM:.0%} headroom: "
        f"{ok / GiB:.1f} GiB)"
    )
    top = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in e.dominant(3))
    lines.append(f"dominant: {top}")
    lines.append(
        f"predicted step time at {hfu:.0%} of peak (HFU: recompute counted): {p.step_seconds(hfu):.1f} s "
        f"({max(b.step_flops for b in p.buckets):.3e} hardware FLOPs per step)"
    )
    return "\n".join(lines)


def suggestions(p: Plan, config, n: int = 3) -> list[str]:
    """The fastest layouts that fit, with the overrides that select them."""
    found = search(
        p.model,
        [b.bucket for b in p.buckets],
        gpus=p.gpus,
        kind=p.kind,
        text_len=as_run_config(config).data.text_len,
        limit=n,
        distributed_optimizer=p.distributed_optimizer,
        params_dtype=p.params_dtype,
        compute_dtype=as_run_config(config).compute_dtype,
    )
    if not found:
        return [f"no layout of {p.gpus} GPUs fits: use more GPUs, shorter clips or a smaller global batch"]
    lines = ["layouts that fit, fastest first (estimates; re-run the planner on the change):"]
    for q in found:
        lines.append(f"  {q.layout.describe()}: {q.total / GiB:.1f} GiB")
        lines.append(f"    {overrides(q.layout)}")
    return lines


def summary(p: Plan, hfu: float = 0.4) -> dict:
    """The plan as plain data (bench/plan_targets.py --backend=megatron collects these)."""
    w = p.worst
    return {
        "layout": dataclasses.asdict(p.layout),
        "gpus": p.gpus,
        "kind": p.kind,
        "data_parallel": p.data_parallel,
        "buckets": [
            {
                "bucket": list(b.bucket),
                "micro_batch": b.micro_batch,
                "accumulation": b.accumulation,
                "bytes": b.estimate.total,
            }
            for b in p.buckets
        ],
        "bucket": list(w.bucket),
        "state_bytes": w.estimate.state_total,
        "activation_bytes": w.estimate.activation_total,
        "total_bytes": w.estimate.total,
        "memory_bytes": DEVICES[p.kind]["memory"],
        "budget_bytes": budget(p.kind),
        "fits": p.fits,
        "parts": {**w.estimate.state, **w.estimate.activations},
        "step_seconds": p.step_seconds(hfu),
        "hfu": hfu,
    }


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    config = as_run_config(FLAGS.config)  # errors name the --config. flag (mugv.run.cli)
    t = config.target  # the pod the config was laid out for (configs/mugv_10b.py)
    name, target_kind, target_devices = t.name, t.kind, t.devices
    kind = FLAGS.kind or (target_kind if target_kind in DEVICES else "h100")
    gpus = FLAGS.gpus or target_devices
    if not gpus:
        raise ValueError("python -m mugv_megatron.plan needs --gpus=N (the config names no target pod)")
    if name and target_kind not in DEVICES:
        print(
            f"note: the config was laid out for {name} ({target_kind}); "
            f"planning its megatron section on {gpus} × {kind}"
        )
    try:
        p = plan_config(config, gpus, kind)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {config.model}, stage {config.stage or '-'}" + (f", pod {name}" if name else ""))
    print(report(p, FLAGS.hfu))
    if not p.fits:
        print("\n".join(suggestions(p, config)))
    if FLAGS.json:
        tmp = f"{FLAGS.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(summary(p, FLAGS.hfu), f, indent=1)
        os.replace(tmp, FLAGS.json)
    return 0 if p.fits else 1


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "training config (configs/*.py[:stage[:pod]]); override with --config.megatron.<field>=V",
        lock_config=True,
    )
    flags.DEFINE_integer("gpus", None, "GPUs of the run (default: config.target.devices)")
    flags.DEFINE_string("kind", None, f"GPU kind: {', '.join(sorted(DEVICES))} (default: the config's pod, else h100)")
    flags.DEFINE_float("hfu", 0.4, "share of peak FLOP/s assumed for the step time, recompute counted (HFU)")
    flags.DEFINE_string("json", None, "also write the plan as JSON to this path")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from mugv.run.cli import run_app

    _define_flags()
    run_app(main)
