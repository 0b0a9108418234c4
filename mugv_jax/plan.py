"""Plan a pod run on the CPU: per-device memory, FLOPs and step time of the real train step.

    python -m mugv_jax.plan --config=configs/mugv_10b.py:video_720 --devices=256 --kind=tpu-v5p \
        [--config.mesh.ici.fsdp=64 --config.mesh.ici.context=4 ...] [--remat=full] [--mfu=0.4]

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
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from mugv.training import ObjectiveConfig, OptimConfig

GiB = 1024 ** 3

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
    params_bytes: int          # per device
    optimizer_bytes: int       # Adam moments, per device
    ema_bytes: int
    other_state_bytes: int     # null caption, counters
    batch_bytes: int
    temp_bytes: int            # XLA temporaries: activations, gradients, buffers
    xla_argument_bytes: int
    xla_output_bytes: int
    xla_alias_bytes: int
    analytic_flops: float      # whole step, all devices
    xla_flops: float | None    # per device as XLA counts it (scan body once)
    compile_seconds: float

    @property
    def state_bytes(self):
        return self.params_bytes + self.optimizer_bytes + self.ema_bytes + self.other_state_bytes

    @property
    def total_bytes(self):
        # Donated state aliases its output, so peak = arguments + temporaries (+ non-aliased outputs).
        return self.xla_argument_bytes + self.temp_bytes + max(self.xla_output_bytes - self.xla_alias_bytes, 0)


def _per_device_bytes(tree) -> int:
    import jax
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def plan_step(config, *, bucket_index: int | None = None, devices=None) -> Plan:
    """Compile the train step of `config` (an ml_collections training config) for its mesh over
    `devices` (default all) with abstract inputs, and measure it."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from mugv import flops as flops_lib
    from mugv.geometry import num_video_tokens
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.train import step as trainer_lib
    from mugv_jax.dit.model import RuntimeOptions
    from mugv.training import dataclass_from as _dataclass_from, model_config_from

    model_cfg = model_config_from(config)
    options = RuntimeOptions(compute_dtype=config.compute_dtype, attention=config.attention,
                             remat=config.remat,
                             context_parallel=config.get("context_parallel", "none") or "none")
    mesh = mesh_lib.build_mesh(dict(config.mesh.ici), dict(config.mesh.get("dcn", {}) or {}), devices=devices)
    trainer = trainer_lib.Trainer(model_cfg, options, _dataclass_from(OptimConfig, config.optim),
                                  _dataclass_from(ObjectiveConfig, config.objective), mesh)
    buckets = [tuple(int(v) for v in b) for b in config.data.buckets]
    if bucket_index is None:  # the most tokens per step is the memory peak
        bucket_index = max(range(len(buckets)),
                           key=lambda i: buckets[i][3] * num_video_tokens(buckets[i][:3], model_cfg))
    f, h, w, batch = buckets[bucket_index]
    text_len = int(config.data.text_len)
    batch_abstract = {
        "latents": jax.ShapeDtypeStruct((batch, model_cfg.in_channels, f, h, w), np.float32),
        "y": jax.ShapeDtypeStruct((batch, 1, text_len, model_cfg.text_dim), np.float32),
        "mask": jax.ShapeDtypeStruct((batch, text_len), np.int32),
        "fps": jax.ShapeDtypeStruct((batch,), np.float32),
    }
    batch_sh = trainer.batch_sharding(batch_abstract)
    batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
                      for k, v in batch_abstract.items()}
    state = trainer.abstract_state()
    state_sh = jax.tree.map(lambda a: a.sharding, state)
    step = jax.jit(trainer._step_fn, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_abstract).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_tok = num_video_tokens((f, h, w), model_cfg)
    other = {k: v for k, v in state.items() if k not in ("params", "opt_state", "ema")}
    return Plan(
        mesh=dict(mesh.shape), bucket=(f, h, w, batch),
        params_bytes=_per_device_bytes(state["params"]), optimizer_bytes=_per_device_bytes(state["opt_state"]),
        ema_bytes=_per_device_bytes(state["ema"]), other_state_bytes=_per_device_bytes(other),
        batch_bytes=_per_device_bytes(batch_abstract), temp_bytes=int(mem.temp_size_in_bytes),
        xla_argument_bytes=int(mem.argument_size_in_bytes), xla_output_bytes=int(mem.output_size_in_bytes),
        xla_alias_bytes=int(mem.alias_size_in_bytes),
        analytic_flops=flops_lib.step_flops(model_cfg, batch, n_tok, text_len).train,
        xla_flops=float(cost["flops"]) if cost and "flops" in cost else None, compile_seconds=seconds)


def report(p: Plan, kind: str, mfu: float) -> str:
    dev = DEVICE_KINDS[kind]
    n = math.prod(p.mesh.values())
    step_s = p.analytic_flops / (n * dev["peak"] * mfu)
    g = lambda b: f"{b / GiB:8.2f} GiB"
    fits = p.total_bytes <= dev["hbm"]
    lines = [
        f"mesh {p.mesh} ({n} devices, {kind}), bucket (frames, h, w, batch) = {p.bucket}",
        "per device:",
        f"  parameters (float32)      {g(p.params_bytes)}",
        f"  optimizer (Adam moments)  {g(p.optimizer_bytes)}",
        f"  EMA                       {g(p.ema_bytes)}",
        f"  batch + other state       {g(p.batch_bytes + p.other_state_bytes)}",
        f"  temporaries (XLA)         {g(p.temp_bytes)}   activations, gradients, buffers",
        f"  total (XLA args + temps)  {g(p.total_bytes)}   of {dev['hbm'] / GiB:.0f} GiB HBM: "
        + ("fits" if fits else "DOES NOT FIT"),
        f"FLOPs per step: analytic {p.analytic_flops:.3e} ({p.analytic_flops / n:.3e} per device); "
        + (f"XLA cost analysis {p.xla_flops:.3e} per device (scanned layer counted once)"
           if p.xla_flops is not None else "XLA cost analysis unavailable"),
        f"predicted step time at {mfu:.0%} MFU ({dev['peak'] / 1e12:.0f} TFLOP/s peak): {step_s:.2f} s",
        f"(compiled in {p.compile_seconds:.0f} s on {os.cpu_count()} CPU cores)",
    ]
    return "\n".join(lines)


def main(argv):
    from absl import flags
    FLAGS = flags.FLAGS
    config = FLAGS.config
    if FLAGS.kind not in DEVICE_KINDS:
        raise ValueError(f"--kind={FLAGS.kind!r}: choose from {sorted(DEVICE_KINDS)}")
    import jax
    if jax.device_count() != FLAGS.devices:
        raise RuntimeError(f"--devices={FLAGS.devices} but JAX sees {jax.device_count()} devices: run "
                           f"`python -m mugv_jax.plan` fresh (it sets XLA_FLAGS before importing jax)")
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
    p = plan_step(config, bucket_index=FLAGS.bucket)
    print(report(p, FLAGS.kind, FLAGS.mfu))
    return 0 if p.total_bytes <= DEVICE_KINDS[FLAGS.kind]["hbm"] else 1


def _prepare_devices(argv):
    """Fake N CPU devices: must be set before jax is imported."""
    n = None
    for a in argv:
        if a.startswith("--devices="):
            n = int(a.split("=", 1)[1])
    if n is None:
        raise SystemExit("python -m mugv_jax.plan needs --devices=N")
    if "jax" in sys.modules:
        raise RuntimeError("mugv_jax.plan must set up its fake devices before jax is imported")
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "training config (configs/*.py[:stage]); override the "
                                    "mesh with --config.mesh.ici.<axis>=N", lock_config=True)
    flags.DEFINE_integer("devices", None, "number of devices of the planned pod")
    flags.DEFINE_string("kind", "tpu-v5p", f"device kind: {', '.join(sorted(DEVICE_KINDS))}")
    flags.DEFINE_string("remat", None, "override config.remat (none, full, dots, dots_no_batch, offload_dots)")
    flags.DEFINE_string("shape", None, "plan this bucket instead of the config's: latent FRAMES,HEIGHT,WIDTH,"
                        "global BATCH (e.g. 14,90,160,64 for 720p 5 s)")
    flags.DEFINE_integer("bucket", None, "index into config.data.buckets (default: most tokens per step)")
    flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for the step-time prediction")
    flags.mark_flags_as_required(["config", "devices"])


if __name__ == "__main__":
    _prepare_devices(sys.argv[1:])
    from absl import app
    _define_flags()
    app.run(main)
