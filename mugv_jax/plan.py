"""Plan a pod run on the CPU: per-device memory, FLOPs and step time of the real train step.

    python -m mugv_jax.plan --config=configs/mugv_10b.py:video_720[:POD] [--devices=128 --kind=tpu-v5p] \
        [--config.mesh.ici.fsdp=64 --config.mesh.ici.context=4 ...] [--remat=full] [--mfu=0.4]

--devices and --kind default to the pod the config was laid out for (`config.target`). Exit
status 0 when the plan fits the device's HBM; otherwise 1, after a list of changes (mesh axis,
micro-batch, remat) with the memory each is estimated to need.

The train step is lowered and compiled with abstract arrays (jax.ShapeDtypeStruct with
shardings; nothing is allocated) over N fake CPU devices, so XLA's SPMD partitioner shards it
exactly as on the pod. Reported per device: parameters, optimizer state and EMA (from the
shardings), the compiled step's temporaries (activations, gradients, collectives buffers: XLA's
memory analysis), total against the device's HBM; FLOPs per step (analytic, mugv/flops.py,
beside XLA's cost analysis) and the step time predicted at the given MFU.

Caveats: the figures come from the CPU compiler. It partitions the same way, but schedules and
fuses differently from the TPU/GPU compilers and may keep bf16 matmul operands in float32, so
temporaries are an estimate (typically pessimistic); leave ~10% headroom. XLA's cost analysis
counts a scanned layer body once, so its FLOPs are far below the analytic count for deep models.
The fused attention kernels cannot run on the CPU: `splash` is compiled in Pallas interpret mode
(the same kernel and custom backward, so the same residuals; like the Mosaic call on a TPU, the
SPMD partitioner cannot split it, so outside a shard_map its operands are gathered), and `cudnn`
is planned with XLA's attention, which is partitioned over batch and heads like cuDNN's custom
partitioning but materialises the scores (an upper bound on the fused kernel's memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time

from mugv.run.config import as_run_config, check_batch_split

GiB = 1024**3

# HBM per device (bytes) and bf16 dense peak (FLOP/s).
DEVICE_KINDS = {
    "tpu-v5p": dict(hbm=95 * GiB, peak=459e12),
    "tpu-v6e": dict(hbm=32 * GiB, peak=918e12),
    "tpu-v5e": dict(hbm=16 * GiB, peak=197e12),
    "h100": dict(hbm=80 * GiB, peak=989e12),
    "h200": dict(hbm=141 * GiB, peak=989e12),
}


@dataclasses.dataclass
class Plan:
    mesh: dict
    bucket: tuple
    params_bytes: int  # per device
    optimizer_bytes: int  # Adam moments, per device
    ema_bytes: int
    other_state_bytes: int  # null caption, counters
    batch_bytes: int
    temp_bytes: int  # XLA temporaries: activations, gradients, buffers
    xla_argument_bytes: int
    xla_output_bytes: int
    xla_alias_bytes: int
    analytic_flops: float  # whole step, all devices
    xla_flops: float | None  # per device as XLA counts it (scan body once)
    compile_seconds: float
    # The layout, for the report and the suggestions.
    grad_accum_steps: int = 1
    remat: str = "full"
    attention: str = "xla"  # backend+mode as configured
    stand_in: str = ""  # how the CPU compiled a kernel that runs only on the pod
    heads: int = 48
    depth: int = 56
    hidden: int = 3456
    tokens: int = 0  # self-attention sequence per sample (video + start/end)

    @property
    def state_bytes(self):
        return self.params_bytes + self.optimizer_bytes + self.ema_bytes + self.other_state_bytes

    @property
    def total_bytes(self):
        # Donated state aliases its output, so peak = arguments + temporaries (+ non-aliased outputs).
        return self.xla_argument_bytes + self.temp_bytes + max(self.xla_output_bytes - self.xla_alias_bytes, 0)

    @property
    def data_parallel(self) -> int:
        return self.mesh.get("data", 1) * self.mesh.get("fsdp", 1)

    @property
    def micro_batch(self) -> int:
        """Samples per data-parallel rank in one micro-batch."""
        return self.bucket[3] // self.grad_accum_steps // self.data_parallel


def _per_device_bytes(tree) -> int:
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def plan_buckets(config) -> list[tuple[int, int, int, int]]:
    """Every batch shape a run of `config` compiles: the video buckets, then (when images are
    mixed in) the image buckets."""
    data = as_run_config(config).data
    return list(data.buckets) + (list(data.mix.image_buckets) if data.mix.on else [])


@contextlib.contextmanager
def cpu_attention_kernels():
    """Make the fused kernels compile on the CPU (see the module docstring): `splash` in Pallas
    interpret mode, `cudnn` as XLA attention. Restores the backend table on exit."""
    import jax

    from mugv_jax.parallel import attention

    if jax.default_backend() != "cpu":
        yield {}
        return
    saved = dict(attention.BACKENDS)
    attention.BACKENDS.update(
        splash=functools.partial(attention._splash_attention, interpret=True), cudnn=attention.BACKENDS["xla"]
    )
    try:
        yield {
            "splash": "splash in Pallas interpret mode",
            "cudnn": "XLA attention in place of cuDNN (scores materialised: an upper bound)",
        }
    finally:
        attention.BACKENDS.clear()
        attention.BACKENDS.update(saved)


def planning_mesh(config, devices=None):
    """The run's mesh over the planning devices. Fake CPU devices form one slice, so a multi-slice
    mesh (config.mesh.dcn) is planned as one mesh of the same axis sizes (dcn × ici per axis):
    the shardings, and every per-device byte, are those of the multi-slice run; only which links
    carry the collectives differs."""
    import jax

    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.parallel.sharding import MESH_AXES

    devices = list(devices if devices is not None else jax.devices())
    mesh = as_run_config(config).mesh
    ici, dcn = mesh.ici.as_dict(), mesh.dcn.as_dict()
    slices = math.prod(dcn.values())
    if slices == 1 or len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        return mesh_lib.build_mesh(ici, dcn, devices=devices)
    if slices < 1 or len(devices) % slices:
        raise ValueError(
            f"mesh.dcn {dcn}: planning on one slice of {len(devices)} devices needs explicit positive slice "
            f"counts whose product divides the devices"
        )
    per_slice = mesh_lib.resolve_axis_sizes(ici, len(devices) // slices, "mesh.ici")
    whole = {a: n * int(dcn.get(a, 1)) for a, n in zip(MESH_AXES, per_slice)}
    return mesh_lib.build_mesh(whole, {}, devices=devices)


def plan_step(config, *, bucket_index: int | None = None, devices=None) -> Plan:
    """Compile the train step of `config` (an ml_collections training config) for its mesh over
    `devices` (default all) with abstract inputs, and measure it. `bucket_index` indexes
    `plan_buckets(config)`; default: the bucket with the most tokens per step."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from mugv import flops as flops_lib
    from mugv.geometry import num_tokens, num_video_tokens
    from mugv_jax.train.backend import build_trainer

    run = as_run_config(config)
    # The trainer the run would build (model, runtime options, optimizer, sharding rules, mesh);
    # the context-parallel mode travels inside `attention` ("splash+ulysses").
    trainer = build_trainer(run, mesh=planning_mesh(run, devices))
    model_cfg, options, optim, mesh = trainer.model_config, trainer.options, trainer.optim, trainer.mesh
    buckets = plan_buckets(run)
    for i, b in enumerate(buckets):  # the trainer's own check (mugv.run.config), on the planned shapes
        check_batch_split(b[3], optim.grad_accum_steps, dict(mesh.shape), f"bucket {i} {b}")
    if bucket_index is None:  # the most tokens per step is the memory peak
        bucket_index = max(
            range(len(buckets)), key=lambda i: buckets[i][3] * num_video_tokens(buckets[i][:3], model_cfg)
        )
    if not 0 <= bucket_index < len(buckets):
        raise ValueError(f"bucket index {bucket_index}: the config has {len(buckets)} buckets {buckets}")
    f, h, w, batch = buckets[bucket_index]
    text_len = run.data.text_len
    batch_abstract = {
        "latents": jax.ShapeDtypeStruct((batch, model_cfg.in_channels, f, h, w), np.float32),
        "y": jax.ShapeDtypeStruct((batch, 1, text_len, model_cfg.text_dim), np.float32),
        "mask": jax.ShapeDtypeStruct((batch, text_len), np.int32),
        "fps": jax.ShapeDtypeStruct((batch,), np.float32),
    }
    batch_sh = trainer.batch_sharding(batch_abstract)
    batch_abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch_abstract.items()
    }
    state = trainer.abstract_state()
    state_sh = jax.tree.map(lambda a: a.sharding, state)
    step = jax.jit(
        trainer._step_fn,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()
    with cpu_attention_kernels() as stand_ins:
        compiled = step.lower(state, batch_abstract).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_tok = num_video_tokens((f, h, w), model_cfg)
    other = {k: v for k, v in state.items() if k not in ("params", "opt_state", "ema")}
    return Plan(
        mesh=dict(mesh.shape),
        bucket=(f, h, w, batch),
        params_bytes=_per_device_bytes(state["params"]),
        optimizer_bytes=_per_device_bytes(state["opt_state"]),
        ema_bytes=_per_device_bytes(state["ema"]),
        other_state_bytes=_per_device_bytes(other),
        batch_bytes=_per_device_bytes(batch_abstract),
        temp_bytes=int(mem.temp_size_in_bytes),
        xla_argument_bytes=int(mem.argument_size_in_bytes),
        xla_output_bytes=int(mem.output_size_in_bytes),
        xla_alias_bytes=int(mem.alias_size_in_bytes),
        analytic_flops=flops_lib.step_flops(model_cfg, batch, n_tok, text_len).train,
        xla_flops=float(cost["flops"]) if cost and "flops" in cost else None,
        compile_seconds=seconds,
        grad_accum_steps=optim.grad_accum_steps,
        remat=options.remat,
        attention=run.attention,
        stand_in=stand_ins.get(options.attention, ""),
        heads=model_cfg.num_heads,
        depth=model_cfg.depth,
        hidden=model_cfg.hidden_size,
        tokens=num_tokens((f, h, w), model_cfg),
    )


HEADROOM = 0.10  # the CPU figures are estimates: keep this share of HBM free


def fits(p: Plan, kind: str) -> bool:
    return p.total_bytes <= DEVICE_KINDS[kind]["hbm"]


def report(p: Plan, kind: str, mfu: float) -> str:
    dev = DEVICE_KINDS[kind]
    n = math.prod(p.mesh.values())
    step_s = p.analytic_flops / (n * dev["peak"] * mfu)
    g = lambda b: f"{b / GiB:8.2f} GiB"
    free = 1 - p.total_bytes / dev["hbm"]
    verdict = (
        (
            f"fits ({free:.0%} free)"
            if free >= HEADROOM
            else f"fits, but under {HEADROOM:.0%} headroom ({free:.0%} free)"
        )
        if fits(p, kind)
        else "DOES NOT FIT"
    )
    backend, _, mode = p.attention.partition("+")
    lines = [
        f"mesh {p.mesh} ({n} devices, {kind}), bucket (frames, h, w, batch) = {p.bucket}",
        f"layout: attention {backend}, context parallel {mode or 'none'}, remat {p.remat}; global batch "
        f"{p.bucket[3]} = {p.grad_accum_steps} micro-batch(es) × {p.bucket[3] // p.grad_accum_steps} "
        f"({p.micro_batch} per data-parallel rank of {p.data_parallel}), {p.tokens} tokens per sample",
    ]
    if p.stand_in:
        lines.append(f"  (compiled on the CPU with {p.stand_in})")
    lines += [
        "per device:",
        f"  parameters (float32)      {g(p.params_bytes)}",
        f"  optimizer (Adam moments)  {g(p.optimizer_bytes)}",
        f"  EMA                       {g(p.ema_bytes)}",
        f"  batch + other state       {g(p.batch_bytes + p.other_state_bytes)}",
        f"  temporaries (XLA)         {g(p.temp_bytes)}   activations, gradients, buffers",
        f"  total (XLA args + temps)  {g(p.total_bytes)}   of {dev['hbm'] / GiB:.0f} GiB HBM: " + verdict,
        f"FLOPs per step: analytic {p.analytic_flops:.3e} ({p.analytic_flops / n:.3e} per device); "
        + (
            f"XLA cost analysis {p.xla_flops:.3e} per device (scanned layer counted once)"
            if p.xla_flops is not None
            else "XLA cost analysis unavailable"
        ),
        f"predicted step time at {mfu:.0%} MFU ({dev['peak'] / 1e12:.0f} TFLOP/s peak): {step_s:.2f} s",
        f"(compiled in {p.compile_seconds:.0f} s on {os.cpu_count()} CPU cores)",
    ]
    if not fits(p, kind) or free < HEADROOM:
        lines += suggestions(p, kind)
    return "\n".join(lines)


# --- what to change when a plan does not fit ------------------------------------------------------
#
# The measured plan is split into three parts that scale differently with the layout:
#   sharded  parameters, Adam moments and EMA (arguments), and the optimizer step's float32
#            temporaries: gradients, updates, new moments (UPDATE_BUFFERS parameter-sized buffers,
#            + the accumulator when grad_accum > 1); all divided by fsdp;
#   act      the rest of XLA's temporaries (activations, attention, collective buffers): in
#            proportion to the tokens one device processes per micro-batch, micro × tokens / context;
#   rest     batch and other state (unchanged).
# These are estimates scaled from one compiled step (tests/jax/test_plan.py checks them against
# re-planned steps of the tiny model); re-run the planner on the suggestion.
UPDATE_BUFFERS = 3


@dataclasses.dataclass(frozen=True)
class Layout:
    data: int
    fsdp: int
    tensor: int
    context: int
    micro: int  # samples per data-parallel rank per micro-batch
    remat: str
    mode: str  # context-parallel mode: none | ulysses | ring

    @property
    def dp(self):
        return self.data * self.fsdp


@dataclasses.dataclass(frozen=True)
class _Model:
    params: float  # per device at fsdp = `fsdp`
    fsdp: int
    act: float  # at micro, context, remat of the measured layout
    micro: int
    context: int
    remat: str
    rest: float
    batch: int
    heads: int
    depth: int
    hidden: int
    tokens: int

    def estimate(self, lay: Layout) -> float:
        params = self.params * self.fsdp / lay.fsdp
        accum = self.batch // (lay.dp * lay.micro)
        sharded = params * (4 + UPDATE_BUFFERS + (accum > 1))
        act = self.act * (lay.micro / self.micro) * (self.context / lay.context)
        if lay.remat == "full" and self.remat != "full":
            # Layer inputs (float32) of every layer, plus one layer's working set.
            tokens = lay.micro * self.tokens / lay.context
            act = self.depth * tokens * self.hidden * 4 + act / self.depth
        return sharded + act + self.rest


def _model(p: Plan) -> _Model:
    grads = p.params_bytes * (UPDATE_BUFFERS + (p.grad_accum_steps > 1))
    act = max(p.temp_bytes - grads, 0)
    sharded = p.params_bytes + p.optimizer_bytes + p.ema_bytes + grads
    return _Model(
        params=p.params_bytes,
        fsdp=p.mesh.get("fsdp", 1),
        act=act,
        micro=p.micro_batch,
        context=p.mesh.get("context", 1),
        remat=p.remat,
        rest=p.total_bytes - sharded - act,
        batch=p.bucket[3],
        heads=p.heads,
        depth=p.depth,
        hidden=p.hidden,
        tokens=p.tokens,
    )


def _moves(lay: Layout, m: _Model, kernel: str):
    """Single changes of a layout that keep the global batch and every divisibility rule."""

    def ok(new: Layout) -> bool:
        return (
            m.hidden % new.fsdp == 0
            and new.micro >= 1
            and m.batch % (new.dp * new.micro) == 0
            and (new.mode != "ulysses" or m.heads % (new.tensor * new.context) == 0)
        )

    out = []
    if lay.data > 1:  # shard the state over all data-parallel ranks
        for k in sorted({k for k in range(2, lay.data + 1) if lay.data % k == 0}, reverse=True):
            new = dataclasses.replace(lay, data=lay.data // k, fsdp=lay.fsdp * k)
            if ok(new):
                out.append((f"raise fsdp {lay.fsdp} → {new.fsdp} (data {lay.data} → {new.data})", new))
                break
    if lay.micro > 1:  # fewer samples per micro-batch, more accumulation steps
        smaller = max(d for d in range(1, lay.micro) if lay.micro % d == 0)
        new = dataclasses.replace(lay, micro=smaller)
        if ok(new):
            out.append((f"lower the micro-batch {lay.micro} → {smaller} per data-parallel rank", new))
    # Split each sample's tokens over twice the devices, taken from data (else fsdp).
    mode = lay.mode if lay.mode != "none" else ("ulysses" if kernel in ("splash", "cudnn") else "ring")
    for attr in ("data", "fsdp"):
        if getattr(lay, attr) % 2 == 0:
            for try_mode in (mode, "ring"):
                new = dataclasses.replace(
                    lay, context=lay.context * 2, mode=try_mode, **{attr: getattr(lay, attr) // 2}
                )
                if ok(new):
                    out.append(
                        (
                            f"raise context {lay.context} → {new.context} ({try_mode}; {attr} "
                            f"{getattr(lay, attr)} → {getattr(new, attr)})",
                            new,
                        )
                    )
                    break
            break
    if lay.remat != "full":
        out.append((f"remat {lay.remat} → full", dataclasses.replace(lay, remat="full")))
    return out


def _describe(old: Layout, new: Layout, batch: int) -> str:
    accum = lambda lay: batch // (lay.dp * lay.micro)
    parts = [
        f"{name} {a} → {b}"
        for name, a, b in (
            (
                "mesh (data, fsdp, tensor, context)",
                (old.data, old.fsdp, old.tensor, old.context),
                (new.data, new.fsdp, new.tensor, new.context),
            ),
            ("context parallel", old.mode, new.mode),
            ("micro-batch per data-parallel rank", old.micro, new.micro),
            ("grad_accum_steps", accum(old), accum(new)),
            ("remat", old.remat, new.remat),
        )
        if a != b
    ]
    return "; ".join(parts)


def _size(b: float) -> str:
    return f"{b / GiB:.1f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"


def _overrides(lay: Layout, kernel: str, batch: int) -> str:
    attention = kernel + ("" if lay.mode == "none" else f"+{lay.mode}")
    return (
        f"--config.mesh.ici.data={lay.data} --config.mesh.ici.fsdp={lay.fsdp} "
        f"--config.mesh.ici.tensor={lay.tensor} --config.mesh.ici.context={lay.context} "
        f"--config.attention={attention} --config.remat={lay.remat} "
        f"--config.optim.grad_accum_steps={batch // (lay.dp * lay.micro)}"
    )


def suggestions(p: Plan, kind: str) -> list[str]:
    """What to change, with the memory each change is estimated to need; then the chain of the
    best changes that reaches the headroom target."""
    hbm = DEVICE_KINDS[kind]["hbm"]
    kernel, _, mode = p.attention.partition("+")
    m = _model(p)
    lay = Layout(
        p.mesh.get("data", 1),
        p.mesh.get("fsdp", 1),
        p.mesh.get("tensor", 1),
        p.mesh.get("context", 1),
        p.micro_batch,
        p.remat,
        mode or "none",
    )
    lines = [
        f"to fit (estimates scaled from this plan; re-run the planner on the change; target ≤ "
        f"{1 - HEADROOM:.0%} of {hbm / GiB:.0f} GiB):"
    ]
    moves = sorted(_moves(lay, m, kernel), key=lambda mv: m.estimate(mv[1]))
    if not moves:
        return lines + ["  no single change applies: use more devices or a smaller bucket"]
    for what, new in moves:
        lines.append(f"  {what}: ≈ {_size(m.estimate(new))}")
    cur = lay
    for _ in range(8):
        if m.estimate(cur) <= (1 - HEADROOM) * hbm:
            break
        options = sorted(_moves(cur, m, kernel), key=lambda mv: m.estimate(mv[1]))
        if not options or m.estimate(options[0][1]) >= m.estimate(cur):
            break
        cur = options[0][1]
    if cur != lay:
        verdict = "fits" if m.estimate(cur) <= hbm else "still does not fit"
        lines.append(f"  together: {_describe(lay, cur, p.bucket[3])}: ≈ {_size(m.estimate(cur))} ({verdict})")
        lines.append(f"    {_overrides(cur, kernel, p.bucket[3])}")
    return lines


def summary(p: Plan, kind: str, mfu: float) -> dict:
    """The plan as plain data (bench/plan_*.py collect these)."""
    dev = DEVICE_KINDS[kind]
    n = math.prod(p.mesh.values())
    return {
        **dataclasses.asdict(p),
        "kind": kind,
        "hbm_bytes": dev["hbm"],
        "total_bytes": p.total_bytes,
        "state_bytes": p.state_bytes,
        "fits": fits(p, kind),
        "micro_batch": p.micro_batch,
        "step_seconds": p.analytic_flops / (n * dev["peak"] * mfu),
        "mfu": mfu,
    }


def write_json(p: Plan, kind: str, mfu: float, path: str) -> None:
    from mugv.io import atomic

    atomic.write_json(path, summary(p, kind, mfu), indent=1)


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    config = FLAGS.config
    target = as_run_config(config).target  # validates the config: errors name the --config. flag
    name, target_kind, target_devices = target.name, target.kind, target.devices
    kind = FLAGS.kind or target_kind or "tpu-v5p"
    devices = FLAGS.devices or target_devices
    if kind not in DEVICE_KINDS:
        raise ValueError(f"--kind={kind!r}: choose from {sorted(DEVICE_KINDS)}")
    if not devices:
        raise ValueError("python -m mugv_jax.plan needs --devices=N (the config names no target pod)")
    if "jax" not in sys.modules:  # --devices was not on the command line: the config's pod
        _fake_devices(devices)
    import jax

    if jax.device_count() != devices:
        raise RuntimeError(
            f"planning {devices} devices but JAX sees {jax.device_count()}: run "
            f"`python -m mugv_jax.plan` fresh (it sets XLA_FLAGS before importing jax)"
        )
    if name and (devices, kind) != (target_devices, target_kind):
        print(
            f"note: the config's layout was planned for {name} ({target_devices} × {target_kind}); "
            f"planning it on {devices} × {kind}"
        )
    with config.unlocked():
        if FLAGS.remat:
            config.remat = FLAGS.remat
        if FLAGS.shape:
            try:
                shape = tuple(int(v) for v in FLAGS.shape.split(","))
                assert len(shape) == 4
            except (ValueError, AssertionError):
                raise ValueError(f"--shape={FLAGS.shape!r}: want FRAMES,HEIGHT,WIDTH,BATCH in latent units") from None
            config.data.buckets = (shape,)
            config.data.mix.image_fraction_start = config.data.mix.image_fraction_end = 0.0
    run = as_run_config(config)
    p = plan_step(run, bucket_index=FLAGS.bucket)
    print(
        f"model {run.model}, stage {run.stage or '-'}"
        + (f", layout planned for {name} ({target_devices} × {target_kind})" if name else "")
    )
    print(report(p, kind, FLAGS.mfu))
    if FLAGS.json:
        write_json(p, kind, FLAGS.mfu, FLAGS.json)
    dcn = run.mesh.dcn.as_dict()
    if math.prod(dcn.values()) > 1 and not fits(p, kind):
        print(f"note: the mesh spans slices (mesh.dcn = {dcn}); the overrides above are for one slice")
    return 0 if fits(p, kind) else 1


def _fake_devices(n: int) -> None:
    """Fake N CPU devices: must be set before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("mugv_jax.plan must set up its fake devices before jax is imported")
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _prepare_devices(argv):
    """--devices=N on the command line fakes N devices now; otherwise main() takes the config's
    target pod (the config is read without importing jax)."""
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            _fake_devices(int(a.split("=", 1)[1]))
        elif a == "--devices" and i + 1 < len(argv):
            _fake_devices(int(argv[i + 1]))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "training config (configs/*.py[:stage[:pod]]); override the mesh with --config.mesh.ici.<axis>=N",
        lock_config=True,
    )
    flags.DEFINE_integer("devices", None, "number of devices of the planned pod (default: config.target.devices)")
    flags.DEFINE_string(
        "kind", None, f"device kind: {', '.join(sorted(DEVICE_KINDS))} (default: config.target.kind, else tpu-v5p)"
    )
    flags.DEFINE_string("remat", None, "override config.remat (none, full, dots, dots_no_batch, offload_dots)")
    flags.DEFINE_string(
        "shape",
        None,
        "plan this bucket instead of the config's: latent FRAMES,HEIGHT,WIDTH,"
        "global BATCH (e.g. 14,90,160,64 for 720p 5 s)",
    )
    flags.DEFINE_integer(
        "bucket",
        None,
        "index into the config's buckets, video then mixed-in image buckets (default: the most tokens per step)",
    )
    flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for the step-time prediction")
    flags.DEFINE_string("json", None, "also write the plan as JSON to this path")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    _prepare_devices(sys.argv[1:])
    from mugv.run.cli import run_app

    _define_flags()
    run_app(main)
