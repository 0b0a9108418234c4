"""Lower the real train step for a pod on any machine: `jax.export` over an abstract mesh.

    python -m mugv_jax.export --config=configs/mugv_10b.py:video_720[:POD] [--bucket=I]

The mesh is a `jax.sharding.AbstractMesh` of the pod's real device count, (data, fsdp, tensor,
context) as the config lays it out, whose abstract device names the pod's chip. JAX's TPU
lowering (the Pallas/Mosaic kernels, serialized into `tpu_custom_call`s) or CUDA lowering (cuDNN's
fused attention custom calls; cuDNN's version probe answered with CUDNN_VERSION) then runs on a
CPU-only machine with one device. Nothing is allocated, compiled for the chip or run. What it
proves: the step traces and lowers for the pod; every attention (self and cross, forward and
backward) calls a fused kernel, on the per-device operands the layout implies; the parameters,
optimizer state and batch enter and leave with the planned shardings, and the residual stream is
constrained to its planned sharding. What it does not: Mosaic compiles the kernels on the TPU host
(block shapes, VMEM limits), XLA compiles the program for the chip. bench/export_pods.py exports
every shipped layout; tests/mugv_jax/test_export.py exports one in CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import time

# Device kind → (JAX platform, the device kind string the chip reports, jax.export platform).
DEVICES = {
    "tpu-v5p": ("tpu", "TPU v5p", "tpu"),
    "tpu-v6e": ("tpu", "TPU v6 lite", "tpu"),
    "tpu-v5e": ("tpu", "TPU v5 lite", "tpu"),
    "h100": ("gpu", "NVIDIA H100 80GB HBM3", "cuda"),
    "h200": ("gpu", "NVIDIA H200", "cuda"),
}
CUDNN_VERSION = 90800  # the lent GPU image's cuDNN 9.8 (docs/benchmarks.md)
CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


def abstract_mesh(ici: dict, kind: str):
    """A (data, fsdp, tensor, context) AbstractMesh of `kind` devices (no devices needed)."""
    import jax

    from mugv_jax.parallel.sharding import MESH_AXES

    if kind not in DEVICES:
        raise ValueError(f"device kind {kind!r}: choose from {sorted(DEVICES)}")
    platform, device_kind, _ = DEVICES[kind]
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform=platform)
    # Auto axes, like the trainer's device mesh: newer jax (0.12) makes an AbstractMesh's axes
    # Explicit by default, which types every array's sharding and refuses the accumulation reshape.
    return jax.sharding.AbstractMesh(
        tuple(int(ici.get(a, 1)) for a in MESH_AXES),
        MESH_AXES,
        abstract_device=device,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


@contextlib.contextmanager
def _cudnn_probe_answered():
    """cuDNN's version probe asks the GPU plugin; lowering for CUDA here answers it."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    saved = fa.check_cudnn_version
    fa.check_cudnn_version = lambda: CUDNN_VERSION
    try:
        yield
    finally:
        fa.check_cudnn_version = saved


def export_step(trainer, batch_shapes: dict, kind: str):
    """(exported, abstract state, abstract batch) of `trainer`'s step lowered for `kind`. The
    trainer's mesh is `abstract_mesh(..., kind)` for a TPU; cuDNN's lowering needs concrete
    devices, so a GPU export takes a mesh of (fake CPU) devices of the pod's size."""
    import jax

    from mugv_jax.parallel import attention

    platform, _, target = DEVICES[kind]
    step, state, batch = trainer.abstract_step(batch_shapes)
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in CUDNN_CALLS]
    with contextlib.ExitStack() as stack:
        if isinstance(trainer.mesh, jax.sharding.AbstractMesh):
            stack.enter_context(jax.sharding.use_abstract_mesh(trainer.mesh))
        stack.enter_context(attention.lowering_for(platform))
        if target == "cuda":
            stack.enter_context(_cudnn_probe_answered())
        exported = jax.export.export(step, platforms=[target], disabled_checks=checks)(state, batch)
    return exported, state, batch


# --- reading the lowered program ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelCall:
    name: str  # the Mosaic kernel's name, or the cuDNN custom-call target
    phase: str  # "fwd" | "bwd"
    operands: tuple[tuple[int, ...], ...]  # shapes of the 16-bit (q, k, v, ...) operands


def kernel_calls(text: str) -> list[KernelCall]:
    """Every fused attention kernel call in an exported module's text."""
    calls = []
    for line in text.splitlines():
        m = re.search(r"custom_call @([\w$]+)\(", line)
        if not m or m.group(1) not in ("tpu_custom_call", *CUDNN_CALLS):
            continue
        if m.group(1) == "tpu_custom_call":
            found = re.search(r'name = "([^"]+)"', line)
            name = found.group(1) if found else "?"
            phase = "fwd" if "_fwd" in name else "bwd"
        else:
            name = m.group(1)
            phase = "bwd" if name.endswith("Backward") else "fwd"
        sig = line.rsplit(" : (", 1)[1].split(") -> ", 1)[0]
        shapes = re.findall(r"tensor<([0-9x]+)x(?:bf16|f16)>", sig)
        calls.append(KernelCall(name, phase, tuple(tuple(int(v) for v in s.split("x")) for s in shapes)))
    return calls


def _local(size: int, *axes_sizes: int) -> int:
    """A dimension's per-device size under the rules' `spec_for_shape` (axes that do not divide
    it are dropped)."""
    for a in axes_sizes:
        if size % a == 0:
            size //= a
    return size


def expected_attention_shapes(trainer, batch: int, tokens: int, text_len: int) -> dict:
    """{"self"|"cross": (q [b, n, h, d], k [b, n, h, d])} per device, as each attention's kernel
    receives them under the trainer's mesh and context-parallel mode (before kernel padding)."""
    mesh, opts, cfg = dict(trainer.mesh.shape), trainer.options, trainer.model_config
    data, fsdp, tensor, context = (mesh.get(a, 1) for a in ("data", "fsdp", "tensor", "context"))
    micro = batch // trainer.optim.grad_accum_steps
    b = _local(micro, data, fsdp)
    h = _local(cfg.num_heads, tensor)
    n = tokens + (-tokens % context)
    d = cfg.head_dim
    if opts.context_parallel == "ulysses" and context > 1:
        self_q = self_k = (b, n, h // context, d)
    elif opts.context_parallel == "ring" and context > 1:
        self_q = self_k = (b, n // context, h, d)
    else:
        self_q, self_k = (b, n // context, h, d), (b, n, h, d)
    return {"self": (self_q, self_k), "cross": ((b, n // context, h, d), (b, text_len, h, d))}


def attention_coverage(calls: list[KernelCall], expected: dict, implementation: str) -> dict:
    """{(attention, phase): kernel calls on exactly that attention's per-device q and k}."""
    from mugv_jax.parallel import attention

    out = {}
    for which, (q, k) in expected.items():
        qv, kv = attention.kernel_operands(implementation, q, k)
        # A kernel vmapped over samples may carry the samples as a leading operand dimension.
        strip = lambda s, view, b=q[0]: s[1:] if len(s) == len(view) + 1 and s[0] == b else s
        for phase in ("fwd", "bwd"):
            out[(which, phase)] = sum(
                1
                for c in calls
                if c.phase == phase
                and len(c.operands) >= 2
                and strip(c.operands[0], qv) == qv
                and strip(c.operands[1], kv) == kv
            )
    return out


@dataclasses.dataclass
class Export:
    kind: str
    devices: int
    mesh: dict
    attention: str
    bucket: tuple
    calls: list
    coverage: dict  # (self|cross, fwd|bwd) → calls
    shardings_ok: bool
    residual_constraints: int  # sharding constraints on the residual stream with the planned spec
    seconds: float

    @property
    def complete(self) -> bool:
        return self.shardings_ok and self.residual_constraints > 0 and all(self.coverage.values())


def check_shardings(exported, state, batch, mesh) -> bool:
    """The exported step's inputs and state outputs keep the shardings the trainer planned."""
    import jax

    flat_in = jax.tree.leaves((state, batch))
    got_in = exported.in_shardings_jax(mesh)
    if len(got_in) != len(flat_in):
        return False
    ok = all(g.is_equivalent_to(leaf.sharding, len(leaf.shape)) for g, leaf in zip(got_in, flat_in))
    flat_state = jax.tree.leaves(state)
    got_out = exported.out_shardings_jax(mesh)[: len(flat_state)]
    ok &= all(g.is_equivalent_to(leaf.sharding, len(leaf.shape)) for g, leaf in zip(got_out, flat_state))
    return ok and any(not g.is_fully_replicated for g in got_in)


def residual_constraints(text: str, trainer, batch: int, tokens: int) -> int:
    """Sharding constraints in the module on the float32 residual stream [micro, n, hidden] with
    the rules' spec for ("batch", "length", "act_embed")."""
    from mugv_jax.parallel import sharding

    micro = batch // trainer.optim.grad_accum_steps
    context = sharding.logical_to_spec(("length",), trainer.rules, trainer.mesh)[0]
    n = tokens + (-tokens % dict(trainer.mesh.shape).get("context", 1) if context else 0)
    shape = (micro, n, trainer.model_config.hidden_size)
    spec = sharding.spec_for_shape(shape, ("batch", "length", "act_embed"), trainer.mesh, trainer.rules)
    axes = lambda e: "" if e is None else ", ".join(f'"{a}"' for a in ((e,) if isinstance(e, str) else e))
    want = "[" + ", ".join("{" + axes(e) + "}" for e in tuple(spec) + (None,) * (3 - len(spec))) + "]"
    ty = "x".join(str(v) for v in shape) + "xf32"
    return sum(
        1 for line in text.splitlines() if "sharding_constraint" in line and f"tensor<{ty}>" in line and want in line
    )


def export_config(config, kind: str, devices: int, bucket_index: int | None = None) -> Export:
    """Export the train step of a training config for `devices` × `kind` at its planned layout."""
    import jax

    from mugv.geometry import num_tokens
    from mugv.run.config import model_config_from
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.plan import plan_buckets
    from mugv_jax.train import backend as train_backend
    from mugv_jax.train import step as trainer_lib

    ici = dict(config.mesh.ici)
    if math.prod(int(v) for v in ici.values()) != devices:
        raise ValueError(f"config.mesh.ici {ici} does not cover {devices} devices ({kind})")
    if DEVICES[kind][0] == "tpu":
        mesh = abstract_mesh(ici, kind)
    elif jax.device_count() >= devices:  # cuDNN lowers only over concrete devices
        mesh = mesh_lib.build_mesh(ici, devices=jax.devices()[:devices])
    else:
        raise RuntimeError(
            f"lowering for {kind} needs {devices} devices to lay the mesh on, JAX sees {jax.device_count()}: "
            f"run `python -m mugv_jax.export` fresh (it fakes them)"
        )
    trainer = train_backend.build_trainer(config, mesh=mesh)
    model_cfg = model_config_from(config)
    buckets = plan_buckets(config)
    f, h, w, batch = buckets[bucket_index or 0]
    text_len = int(config.data.text_len)
    t0 = time.perf_counter()
    exported, state, abstract_batch = export_step(
        trainer, trainer_lib.batch_shapes(model_cfg, (f, h, w), batch, text_len), kind
    )
    text = exported.mlir_module()
    tokens = num_tokens((f, h, w), model_cfg)
    calls = kernel_calls(text)
    expected = expected_attention_shapes(trainer, batch, tokens, text_len)
    return Export(
        kind=kind,
        devices=devices,
        mesh=dict(mesh.shape),
        attention=str(config.attention),
        bucket=(f, h, w, batch),
        calls=calls,
        coverage=attention_coverage(calls, expected, trainer.options.attention),
        shardings_ok=check_shardings(exported, state, abstract_batch, mesh),
        residual_constraints=residual_constraints(text, trainer, batch, tokens),
        seconds=time.perf_counter() - t0,
    )


def report(e: Export) -> str:
    names = sorted({c.name for c in e.calls})
    lines = [
        f"{e.attention} on {e.devices} × {e.kind}, mesh {e.mesh}, bucket {e.bucket}: lowered in {e.seconds:.0f} s",
        f"  fused kernel calls: {len(e.calls)} ({', '.join(names) or 'none'})",
    ]
    for (which, phase), n in sorted(e.coverage.items()):
        lines.append(
            f"  {which}-attention {phase}: {n} call(s) on the per-device operands" + ("" if n else "  MISSING")
        )
    lines.append(
        f"  parameters, optimizer state, batch with the planned shardings: {'yes' if e.shardings_ok else 'NO'}"
    )
    lines.append(f"  residual-stream sharding constraints as planned: {e.residual_constraints}")
    lines.append("complete" if e.complete else "INCOMPLETE")
    return "\n".join(lines)


def main(argv):
    from absl import flags

    from mugv.run.config import as_run_config
    from mugv_jax.plan import _fake_devices

    FLAGS = flags.FLAGS
    config = FLAGS.config
    target = as_run_config(config).target  # validates the config: errors name the --config. flag
    kind, devices = target.kind, target.devices
    if not kind:
        raise ValueError(
            "python -m mugv_jax.export needs a config with a target pod (configs/mugv_10b.py:<stage>:<pod>)"
        )
    if DEVICES[kind][0] == "gpu" and "jax" not in sys.modules:
        _fake_devices(devices)
    e = export_config(config, kind, devices, FLAGS.bucket)
    print(report(e))
    return 0 if e.complete else 1


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config with a target pod", lock_config=True)
    from absl import flags as _flags

    _flags.DEFINE_integer("bucket", None, "index into the config's buckets (default 0)")
    _flags.mark_flags_as_required(["config"])
    app.run(main)
