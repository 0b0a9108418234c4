"""Plan a pod run on the CPU: per-device memory, FLOPs and step time of the real train step.

    python -m mugv_jax.plan --config=configs/mugv_10b.py:video_720[:POD] [--devices=128 --kind=tpu-v5p] \
        [--config.mesh.ici.fsdp=64 --config.mesh.ici.context=4 ...] [--remat=full]

--devices and --kind default to the pod the config was laid out for (`config.target`). Exit
status 0 when the plan fits the device's HBM; otherwise 1, after a list of changes (mesh axis,
micro-batch, remat) with the memory each is estimated to need.

The train step is lowered and compiled with abstract arrays (jax.ShapeDtypeStruct with
shardings; nothing is allocated) over N fake CPU devices, so XLA's SPMD partitioner shards it
exactly as on the pod. Reported per device: parameters, optimizer state and EMA (from the
shardings), the compiled step's temporaries (activations, gradients, collectives buffers: XLA's
memory analysis), total against the device's HBM; FLOPs per step (analytic, mugv/flops.py,
beside XLA's cost analysis), the collectives per step and the partitioner's involuntary
rematerializations, and the step time predicted by a roofline per op class (mugv/roofline.py).

Caveats: the figures come from the CPU compiler. It partitions the same way, but schedules and
fuses differently from the TPU/GPU compilers and may keep bf16 matmul operands in float32, so
temporaries are an estimate (typically pessimistic); leave ~10% headroom. XLA's cost analysis
counts a scanned layer body once, so its FLOPs are far below the analytic count for deep models.
The fused attention kernels cannot run on the CPU: `splash` and `cudnn` (and their ring steps)
are compiled as the blockwise "chunked" kernel (mugv_jax/parallel/blockwise.py) inside the same
shard_maps, with the same collectives and the fused kernels' memory profile: q, k, v, the output
and the log-sum-exp kept for the backward, one block of scores at a time, never the N² scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time

from mugv import roofline
from mugv.run.config import as_run_config, check_batch_split

GiB = 1024**3

# HBM per device (bytes) and bf16 dense peak (FLOP/s); bandwidths and the rest: mugv/roofline.py.
DEVICE_KINDS = {name: dict(hbm=d.hbm, peak=d.peak) for name, d in roofline.DEVICES.items()}


@dataclasses.dataclass
class Plan:
    mesh: dict
    bucket: tuple
    params_bytes: int  # per device: what trains (under LoRA the adapters)
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
    head_dim: int = 72
    depth: int = 56
    hidden: int = 3456
    tokens: int = 0  # self-attention sequence per sample (video + start/end)
    kind: str = "tpu-v5p"  # the device kind the roofline and the collectives' bandwidth are for
    # per step and device: {op: {"count": executions, "bytes": sent}} (mugv_jax/hlo_stats.py)
    collectives: dict = dataclasses.field(default_factory=dict)
    remat_warnings: list = dataclasses.field(default_factory=list)  # SPMD involuntary full remats
    # seconds per op class (mugv/roofline.py): matmul, attention, elementwise, collectives, and
    # step (the prediction), serial (no overlap), mfu, hardware_factor (attention FLOPs factor)
    roofline: dict = dataclasses.field(default_factory=dict)
    # Under LoRA (or config.freeze): the frozen base per device, no gradients, optimizer state or EMA.
    frozen_bytes: int = 0
    frozen_dtype: str = ""
    lora_rank: int = 0

    @property
    def state_bytes(self):
        return self.params_bytes + self.optimizer_bytes + self.ema_bytes + self.frozen_bytes + self.other_state_bytes

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


STAND_IN = "the blockwise stand-in for the fused kernel (O(N·d) residuals, no N² scores)"
# The CPU has no bfloat16 matmuls: its compiler widens a bfloat16 operand to float32, and for a
# base stored in bfloat16 it widens the whole stacked base at once, outside the layer loop (a
# float32 copy of the base in the temporaries: measured +1.9× the base's bytes at tiny width),
# which a TPU or GPU never makes. So a bfloat16 base is compiled as a float32 one, cast to the
# compute dtype layer by layer as the trained weights are, and counted in its own dtype.
BASE_STAND_IN = "the {dtype} base as float32 (the CPU would widen the whole {dtype} stack), counted in {dtype}"


@contextlib.contextmanager
def cpu_attention_kernels():
    """Make the fused kernels compile on the CPU (see the module docstring): `splash` and `cudnn`,
    ring steps included, compute with the blockwise "chunked" kernel inside the same shard_maps."""
    import jax

    from mugv_jax.parallel import attention

    if jax.default_backend() != "cpu":
        yield {}
        return
    with attention.stand_in("chunked"):
        yield {"splash": STAND_IN, "cudnn": STAND_IN}


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


def plan_step(config, *, bucket_index: int | None = None, devices=None, kind: str | None = None) -> Plan:
    """Compile the train step of `config` (an ml_collections training config) for its mesh over
    `devices` (default all) with abstract inputs, and measure it; the step time is predicted for
    `kind` devices (default: the config's target pod, else tpu-v5p). `bucket_index` indexes
    `plan_buckets(config)`; default: the bucket with the most tokens per step."""

    import jax

    from mugv import flops as flops_lib
    from mugv.geometry import num_tokens, num_video_tokens
    from mugv_jax import hlo_stats
    from mugv_jax.train import step as trainer_lib
    from mugv_jax.train.backend import build_trainer

    run = as_run_config(config)
    base_dtype = run.lora.base_dtype if run.lora.on else ""
    widened = base_dtype not in ("", "float32") and jax.default_backend() == "cpu"
    if widened:
        # See BASE_STAND_IN: compiled with a float32 base, its bytes counted in `base_dtype` below.
        run = dataclasses.replace(run, lora=dataclasses.replace(run.lora, base_dtype="float32"))
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
    step, state, batch_abstract = trainer.abstract_step(trainer_lib.batch_shapes(model_cfg, (f, h, w), batch, text_len))
    kind = kind or run.target.kind or "tpu-v5p"
    t0 = time.perf_counter()
    # Compiled here, not read from a persistent cache: the partitioner's log is part of the plan.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with (
            cpu_attention_kernels() as stand_ins,
            hlo_stats.partitioned_module() as (dump, partitioned),
            hlo_stats.capture_compile_log() as log,
        ):
            # LLVM's optimisation level changes only the CPU machine code, which a plan never runs:
            # memory (buffer assignment), FLOPs and collectives come from the HLO passes before it.
            fast = dict(dump, xla_backend_optimization_level=0)
            compiled = step.lower(state, batch_abstract).compile(compiler_options=fast)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_tok = num_video_tokens((f, h, w), model_cfg)
    other = {k: v for k, v in state.items() if k not in ("params", "opt_state", "ema", "frozen")}
    frozen = state.get("frozen", {})
    frozen_bytes = _per_device_bytes(frozen)
    stand_in = stand_ins.get(options.attention, "")
    if widened:
        stored = _per_device_bytes(
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, base_dtype, sharding=a.sharding), frozen)
        )
        # The run's arguments hold the base in its own dtype; the rest of the program is the same.
        argument_bytes = int(mem.argument_size_in_bytes) - (frozen_bytes - stored)
        frozen_bytes = stored
        stand_in = "; ".join(filter(None, (stand_in, BASE_STAND_IN.format(dtype=base_dtype))))
    else:
        argument_bytes = int(mem.argument_size_in_bytes)
    lora = trainer.lora if trainer.lora.on else None
    if lora is not None:
        model_flops = flops_lib.lora_step_flops(model_cfg, batch, n_tok, text_len, lora).train
    else:
        model_flops = flops_lib.step_flops(model_cfg, batch, n_tok, text_len).train
    found = hlo_stats.collectives(partitioned[0] if partitioned else compiled.as_text())
    dev = roofline.DEVICES[kind]
    factor = roofline.hardware_factor(options.attention, model_cfg.head_dim, dev.platform)
    step_cost = roofline.step_cost(
        model_cfg,
        batch / mesh.size,
        n_tok,
        text_len,
        options.remat,
        factor,
        params=_per_device_bytes(state["params"]) / 4,
        tensor=mesh.shape["tensor"],
        lora=lora,
    )
    step_cost = dataclasses.replace(
        step_cost, collective_seconds=hlo_stats.seconds(found, dev.link, dev.node, dev.network)
    )
    pred = roofline.predict(step_cost, dev, model_flops / mesh.size)
    return Plan(
        mesh=dict(mesh.shape),
        bucket=(f, h, w, batch),
        params_bytes=_per_device_bytes(state["params"]),
        frozen_bytes=frozen_bytes,
        frozen_dtype=base_dtype or ",".join(sorted({str(x.dtype) for x in jax.tree.leaves(frozen)})),
        lora_rank=trainer.lora.rank,
        optimizer_bytes=_per_device_bytes(state["opt_state"]),
        ema_bytes=_per_device_bytes(state["ema"]),
        other_state_bytes=_per_device_bytes(other),
        batch_bytes=_per_device_bytes(batch_abstract),
        temp_bytes=int(mem.temp_size_in_bytes),
        xla_argument_bytes=argument_bytes,
        xla_output_bytes=int(mem.output_size_in_bytes),
        xla_alias_bytes=int(mem.alias_size_in_bytes),
        analytic_flops=model_flops,
        xla_flops=float(cost["flops"]) if cost and "flops" in cost else None,
        compile_seconds=seconds,
        grad_accum_steps=optim.grad_accum_steps,
        remat=options.remat,
        attention=run.attention,
        stand_in=stand_in,
        heads=model_cfg.num_heads,
        head_dim=model_cfg.head_dim,
        depth=model_cfg.depth,
        hidden=model_cfg.hidden_size,
        tokens=num_tokens((f, h, w), model_cfg),
        kind=kind,
        collectives=hlo_stats.summarize(found),
        remat_warnings=hlo_stats.involuntary_rematerializations(log[0]),
        roofline=dict(
            matmul=pred.matmul,
            attention=pred.attention,
            elementwise=pred.elementwise,
            collectives=pred.collectives,
            step=pred.seconds,
            serial=pred.serial_seconds,
            mfu=pred.mfu(dev.peak),
            hardware_factor=factor,
            hardware_flops=mesh.size
            * (step_cost.matmul_flops + step_cost.attention_fwd_flops + step_cost.attention_bwd_flops),
        ),
    )


HEADROOM = 0.10  # the CPU figures are estimates: keep this share of HBM free


def fits(p: Plan, kind: str) -> bool:
    return p.total_bytes <= DEVICE_KINDS[kind]["hbm"]


def report(p: Plan, kind: str) -> str:
    dev = DEVICE_KINDS[kind]
    n = math.prod(p.mesh.values())
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
        f"({p.micro_batch} per data-parallel rank of {p.data_parallel}), {p.tokens} tokens per sample"
        + (f"; LoRA rank {p.lora_rank}, base frozen" if p.lora_rank else ""),
    ]
    if p.stand_in:
        lines.append(f"  (compiled on the CPU with {p.stand_in})")
    trained = "LoRA adapters" if p.lora_rank else "parameters"
    lines += ["per device:", f"  {trained + ' (float32)':26}{g(p.params_bytes)}"]
    if p.frozen_bytes:
        lines.append(
            f"  {'frozen base (' + p.frozen_dtype + ')':26}{g(p.frozen_bytes)}   no gradients, optimizer state or EMA"
        )
    lines += [
        f"  optimizer (Adam moments)  {g(p.optimizer_bytes)}",
        f"  EMA                       {g(p.ema_bytes)}",
        f"  batch + other state       {g(p.batch_bytes + p.other_state_bytes)}",
        f"  temporaries (XLA)         {g(p.temp_bytes)}   activations, gradients, buffers",
        f"  total (XLA args + temps)  {g(p.total_bytes)}   of {dev['hbm'] / GiB:.0f} GiB HBM: " + verdict,
        f"FLOPs per step: model {p.analytic_flops:.3e} ({p.analytic_flops / n:.3e} per device"
        + ("; LoRA: no weight gradients of the frozen base" if p.lora_rank else "")
        + "); "
        + (
            f"XLA cost analysis {p.xla_flops:.3e} per device (scanned layer counted once)"
            if p.xla_flops is not None
            else "XLA cost analysis unavailable"
        ),
    ]
    lines += _collective_lines(p) + _roofline_lines(p, kind)
    lines.append(f"(compiled in {p.compile_seconds:.0f} s on {os.cpu_count()} CPU cores)")
    if not fits(p, kind) or free < HEADROOM:
        lines += suggestions(p, kind)
    return "\n".join(lines)


# --- what to change when a plan does not fit ------------------------------------------------------
#
# The measured plan is split into three parts that scale differently with the layout:
#   sharded  parameters, Adam moments and EMA (arguments), a frozen base (LoRA), and the optimizer step's float32
#            temporaries: gradients, updates, new moments (UPDATE_BUFFERS parameter-sized buffers,
#            + the accumulator when grad_accum > 1); all divided by fsdp;
#   act      the rest of XLA's temporaries (activations, attention, collective buffers): in
#            proportion to the tokens one device processes per micro-batch, micro × tokens / context;
#   rest     batch and other state (unchanged).
# These are estimates scaled from one compiled step (tests/mugv_jax/test_plan.py checks them against
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
    frozen: float = 0.0  # a frozen base (LoRA): sharded over fsdp, no gradients or updates

    def estimate(self, lay: Layout) -> float:
        params = self.params * self.fsdp / lay.fsdp
        frozen = self.frozen * self.fsdp / lay.fsdp
        accum = self.batch // (lay.dp * lay.micro)
        sharded = params * (4 + UPDATE_BUFFERS + (accum > 1))
        act = self.act * (lay.micro / self.micro) * (self.context / lay.context)
        if lay.remat == "full" and self.remat != "full":
            # Layer inputs (float32) of every layer, plus one layer's working set.
            tokens = lay.micro * self.tokens / lay.context
            act = self.depth * tokens * self.hidden * 4 + act / self.depth
        return sharded + frozen + act + self.rest


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
        rest=p.total_bytes - sharded - act - p.frozen_bytes,
        frozen=p.frozen_bytes,
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


def _collective_lines(p: Plan) -> list[str]:
    total = sum(v["bytes"] for v in p.collectives.values())
    parts = ", ".join(
        f"{op} {v['count']}× {v['bytes'] / GiB:.2f} GiB" for op, v in sorted(p.collectives.items()) if v["bytes"]
    )
    lines = [f"collectives per step, sent per device: {total / GiB:.2f} GiB ({parts or 'none'})"]
    lines.append(f"SPMD involuntary full rematerializations: {len(p.remat_warnings)}")
    lines += [f"  {w[:300]}" for w in p.remat_warnings]
    return lines


def _roofline_lines(p: Plan, kind: str) -> list[str]:
    r = p.roofline
    if not r:
        return []
    hw = r.get("hardware_flops", 0.0)
    return [
        f"hardware FLOPs per step {hw:.3e} (recompute of remat {p.remat}, attention ×{r['hardware_factor']:.2f} "
        f"for head dim {p.head_dim} on {kind}): {hw / p.analytic_flops:.2f}× the model FLOPs",
        f"step time, roofline per op class on {kind} (mugv/roofline.py): matmul {r['matmul']:.2f} s + attention "
        f"{r['attention']:.2f} s + elementwise {r['elementwise']:.2f} s; collectives {r['collectives']:.2f} s",
        f"predicted step time {r['step']:.2f} s (collectives overlapped; {r['serial']:.2f} s without overlap), "
        f"MFU {r['mfu']:.1%}",
    ]


def summary(p: Plan, kind: str) -> dict:
    """The plan as plain data (bench/plan_*.py collect these)."""
    dev = DEVICE_KINDS[kind]
    return {
        **dataclasses.asdict(p),
        "kind": kind,
        "hbm_bytes": dev["hbm"],
        "total_bytes": p.total_bytes,
        "state_bytes": p.state_bytes,
        "fits": fits(p, kind),
        "micro_batch": p.micro_batch,
        "step_seconds": p.roofline.get("step"),
        "mfu": p.roofline.get("mfu"),
        "remat_warning_count": len(p.remat_warnings),
        "collective_bytes": sum(v["bytes"] for v in p.collectives.values()),
    }


def write_json(p: Plan, kind: str, path: str) -> None:
    from mugv.io import atomic

    atomic.write_json(path, summary(p, kind), indent=1)


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
    p = plan_step(run, bucket_index=FLAGS.bucket, kind=kind)
    print(
        f"model {run.model}, stage {run.stage or '-'}"
        + (f", layout planned for {name} ({target_devices} × {target_kind})" if name else "")
    )
    print(report(p, kind))
    if FLAGS.json:
        write_json(p, kind, FLAGS.json)
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
    flags.DEFINE_string(
        "remat",
        None,
        "override config.remat: none, full, dots, dots_no_batch, offload_dots, or a named save-list "
        "(save_qkv_proj, save_attn_out, save_qkv_attn, offload_qkv_proj, offload_attn_out; mugv_jax/dit/model.py)",
    )
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
    flags.DEFINE_string("json", None, "also write the plan as JSON to this path")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    _prepare_devices(sys.argv[1:])
    from mugv.run.cli import run_app

    _define_flags()
    run_app(main)
