"""One device check for the fused attention paths: golden parity, and profiled 10B-width train steps on one GPU.

    bash bench/device_check.sh              # on the GPU machine: at most --budget (480 s) on one H100/H200
    bash bench/device_check.sh --dry-run    # on a CPU: every default part at tiny width, in-process
    bash bench/device_check.sh --dry-run --parts all    # every variant (~5 min on a busy 2-core VM)

Parts (each in its own process on the GPU, so a crash or an OOM stays in its row and each peak
memory is its own):
  jax_golden       the tiny DiT against the golden vectors (tests/golden) with attention "xla"
                   (float32 and bfloat16) and "cudnn" (bfloat16, cuDNN's padding kernels)
  megatron_golden  the same vectors through the Megatron model with the local specs
                   ("megatron" unfused, "sdpa" torch flash) and the Transformer Engine spec
                   (bfloat16) when transformer_engine imports
  jax_step_xla     one train step of 10B-width layers (hidden 3456, 48 heads, head dim 72,
  jax_step_cudnn   --layers layers, bf16 compute, --remat as the 10B configs, no XLA flags) at the
                   720p×5 s token count (latent 14×90×160 → 50,402 tokens, batch 1, 300 caption
                   tokens): the baselines docs/benchmarks.md recorded
  jax_<attention>_<remat>_<flags>
                   the same step for each attention backend (xla, cudnn) × remat policy (full,
                   dots_no_batch, offload_dots, save_qkv_attn — the named save-list keeping the
                   q/k/v projection and the attention output) × XLA flag set (none, shipped: the
                   XLA_FLAGS of launch/jax_gpu_slurm.sbatch, given as compile options)
  megatron_step    Megatron with TE when it imports, else the local spec on torch SDPA, with
                   per-layer recompute like the JAX step
  megatron_distopt the Megatron GPU training path end to end (bench/megatron_distopt.py)
Each step part times --steps steps (after the first), then profiles --profile-steps more
(jax.profiler / torch.profiler) and prints a per-op table from the trace (bench/profile_table.py):
attention fwd/bwd, matmuls, norms/elementwise, collectives, other and host gaps, in ms per step and
% of the step, beside step time, model TFLOP/s and MFU from mugv/flops.py (one FLOP definition for
both trainers; recompute not counted) and peak device memory. A part whose package is missing is
skipped with the reason printed; the XLA step is skipped where its unfused [B, h, N, N] scores
cannot fit (at 720p always: 454 GiB per layer). The full log and a JSON of every row go to --out
(default $OUT when set).

Budget on the GPU (estimates; the previous lease timed only whole calls): the default parts run
the profile first — jax_step_cudnn and the four remat policies with the shipped flags (~60-90 s
each, the first paying ~60 s of compilation and autotuning, which the others find in the shared
compilation cache), megatron_step (~60 s) — then the parity parts (~30-60 s each) and
megatron_distopt while --budget lasts (counted from device_check.sh's start, so a Transformer
Engine install there is inside it); a part that no longer fits is skipped with the command that
runs it alone. Each part also has its own timeout (TIMEOUTS).

--dry-run runs on the CPU in about a minute: the argument building and geometry of the 720p step
(cuDNN's arguments traced through JAX's checks, the XLA memory estimate), and tiny-width versions
of the parts (cuDNN steps are lowered for CUDA instead of run; the XLA steps are profiled on the
CPU, so the trace parser runs on a real trace).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import inspect
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

from mugv.training import ObjectiveConfig, OptimConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The profiled JAX variants beyond the two baseline steps (jax_step_xla, jax_step_cudnn: remat
# "full", no XLA flags, as recorded in docs/benchmarks.md): attention backend × remat policy
# (mugv_jax/dit/model.py REMAT_POLICIES; save_qkv_attn is the MaxText-style named save-list) × XLA
# flag set ("shipped": what launch/jax_gpu_slurm.sbatch exports).
ATTENTIONS = ("xla", "cudnn")
REMATS = ("full", "dots_no_batch", "offload_dots", "save_qkv_attn")
FLAG_SETS = ("none", "shipped")


def variant_name(attention, remat, flags):
    if remat == "full" and flags == "none":
        return f"jax_step_{attention}"
    return f"jax_{attention}_{remat}_{flags}"


VARIANTS = {variant_name(a, r, f): (a, r, f) for a in ATTENTIONS for r in REMATS for f in FLAG_SETS}
PARTS = (
    "jax_golden",
    "megatron_golden",
    *VARIANTS,
    "megatron_step",
    "megatron_distopt",
)
# The default run, profile first: the cuDNN step (the recorded baseline) and its remat policies
# under the shipped flags, the Megatron step; then the parity and distopt parts while the
# --budget lasts. The XLA step at 720p cannot fit (454 GiB of scores per layer): its row only says so.
DEFAULT_PARTS = (
    "jax_step_cudnn",
    *(variant_name("cudnn", r, "shipped") for r in REMATS),
    "megatron_step",
    "jax_golden",
    "megatron_golden",
    "jax_step_xla",
    "megatron_distopt",
)
# Seconds each part may take on the GPU before it is stopped; the whole run also stops starting
# parts once --budget (480 s) is spent. Expected on one H100/H200 (estimates: the previous lease
# timed only the run as a whole): a cuDNN step variant ~60-90 s (compile ~60 s for the first,
# less once XLA's autotuning results sit in the shared compilation cache; 1 + 2 timed + 1
# profiled steps of ~3 s), the Megatron step ~60 s, the golden parts ~30-60 s each.
TIMEOUTS = {
    "jax_golden": 150,
    "megatron_golden": 60,
    **{name: 120 for name in VARIANTS},
    "jax_step_xla": 60,
    "jax_step_cudnn": 180,
    "megatron_step": 100,
    "megatron_distopt": 200,
}
BUDGET_S = 480
MIN_PART_S = 30  # a part is not started with less of the budget left than this
LATENT_720P = (14, 90, 160)  # 105 frames at 1280×720 (mugv.geometry: 50,400 + 2 tokens)
TEXT_TOKENS = 300  # configs/mugv_10b.py data.text_len
VALID_TEXT = 120  # a caption with padding: the mask path is exercised
# Golden tolerances (tests/mugv_jax/test_dit_golden.py): float32 absolute, bfloat16 relative L2.
GOLDEN_ATOL, BF16_REL_L2 = 1e-4, 1e-2
# A cuDNN version for the lowering-only dry run, where no cuDNN is loaded.
DRY_CUDNN_VERSION = 90800


def log(*args):
    print(*args, flush=True)


# --- shared helpers ------------------------------------------------------------------------------


def _step_config(dry: bool, layers: int):
    from mugv.config import DiTConfig

    if dry:
        return DiTConfig(depth=2, hidden_size=144, num_heads=2, text_dim=64, max_text_tokens=16)
    return DiTConfig(depth=layers, hidden_size=3456, num_heads=48)


def _step_geometry(dry: bool):
    """(latent (T, H, W), caption tokens, valid caption tokens)."""
    return ((2, 4, 6), 8, 5) if dry else (LATENT_720P, TEXT_TOKENS, VALID_TEXT)


def _flops(cfg, latent, text):
    from mugv import flops, geometry

    return flops.step_flops(cfg, 1, geometry.num_video_tokens(latent, cfg), text).train


def _rel_l2(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _max_abs(a, b):
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@contextlib.contextmanager
def _pretend_cuda():
    """Lower for CUDA on a CPU: JAX reports the gpu backend and cuDNN's version probe answers."""
    import unittest.mock as mock

    import jax
    from jax._src.cudnn import fused_attention_stablehlo as fa

    from mugv_jax.parallel import attention

    # lowering_for: the kernels are traced for the GPU even inside the CPU mesh's shardings.
    with (
        mock.patch.object(jax, "default_backend", lambda: "gpu"),
        mock.patch.object(fa, "check_cudnn_version", lambda: DRY_CUDNN_VERSION),
        attention.lowering_for("gpu"),
    ):
        yield


def _cudnn_kernels_in(fn, *args):
    """cuDNN custom-call targets of fn (jitted) lowered for CUDA, and their mask types."""
    import re

    import jax

    names = (
        "__cudnn$fmhaSoftmax",
        "__cudnn$fmhaSoftmaxBackward",
        "__cudnn$fmhaScaleBiasSoftmax",
        "__cudnn$fmhaScaleBiasSoftmaxBackward",
    )
    checks = [jax.export.DisabledSafetyCheck.custom_call(n) for n in names]
    with _pretend_cuda():
        text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
    targets = sorted(set(re.findall(r"custom_call @(__cudnn[\w$]+)\(", text)))
    masks = sorted(set(re.findall(r"mask_type\\22: \\22(\w+)", text)))
    return targets, masks


def _padding_kernels_only(targets, masks, backward):
    """cuDNN's kernels without a bias input; the caption mask as PADDING (self-attention over an
    unpadded sequence has no mask)."""
    want = ["__cudnn$fmhaSoftmax"] + (["__cudnn$fmhaSoftmaxBackward"] if backward else [])
    return targets == want and "PADDING" in masks and set(masks) <= {"PADDING", "NO_MASK"}


def _jax_peak_bytes():
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def _device_name_jax():
    import jax

    d = jax.local_devices()[0]
    return f"{d.platform}:{d.device_kind}"


# --- parts ---------------------------------------------------------------------------------------


def part_jax_golden(args):
    import jax.numpy as jnp

    import mugv_jax.dit as dit
    from tests.helpers import DIT_WEIGHTS, case_inputs, dit_vectors

    rows, ok = [], True
    outs = {}
    variants = [("xla", "float32"), ("xla", "bfloat16")]
    if not args.dry_run:
        variants.append(("cudnn", "bfloat16"))
    for attention, dtype in variants:
        model = dit.load(
            DIT_WEIGHTS, "tiny", options=dit.RuntimeOptions(attention=attention, compute_dtype=getattr(jnp, dtype))
        )
        for case in ("t2v", "i2v"):
            args_, kwargs = case_inputs(case)
            out = model(*args_, **kwargs)
            want = dit_vectors()[f"{case}.out"]
            err = _max_abs(out, want) if dtype == "float32" else _rel_l2(out, want)
            bound = GOLDEN_ATOL if dtype == "float32" else BF16_REL_L2
            good = err <= bound
            ok &= good
            outs[(attention, dtype, case)] = out
            extra = ""
            if attention == "cudnn":
                extra = f", vs xla bf16 rel-L2 {_rel_l2(out, outs[('xla', 'bfloat16', case)]):.2e}"
            rows.append(
                f"{attention}/{dtype}/{case}: {'max-abs' if dtype == 'float32' else 'rel-L2'} "
                f"{err:.2e} (bound {bound:g}){extra}"
            )
            log("  " + rows[-1] + ("" if good else "  <-- FAIL"))
    if args.dry_run:
        # cuDNN cannot run here: lower its forward for CUDA and check the kernels it asks for.
        model = dit.load(DIT_WEIGHTS, "tiny", options=dit.RuntimeOptions(attention="cudnn", compute_dtype=jnp.bfloat16))
        args_, kwargs = case_inputs("t2v")
        targets, masks = _cudnn_kernels_in(lambda *a: model(*a, **kwargs), *args_)
        good = _padding_kernels_only(targets, masks, backward=False)
        ok &= good
        rows.append(f"cudnn/bfloat16/t2v lowered for CUDA: kernels {targets}, mask types {masks}")
        log("  " + rows[-1] + ("" if good else "  <-- FAIL"))
    return dict(status="ok" if ok else "failed", parity=rows, device=_device_name_jax())


def _megatron_golden_model(spec_name, dtype):
    import torch

    from mugv.config import get_config
    from mugv_megatron.model import build as dit
    from mugv_megatron.model.dit import MUGDiT
    from mugv_megatron.model.spec import get_layer_spec
    from mugv_megatron.model.transformer_config import make_transformer_config
    from tests.helpers import DIT_WEIGHTS

    config = get_config("tiny")
    tc = make_transformer_config(config, params_dtype=dtype, perform_initialization=False)
    spec = get_layer_spec(use_te=True) if spec_name == "te" else get_layer_spec(use_te=False, local_attention=spec_name)
    model = MUGDiT(config, tc, spec)
    if torch.cuda.is_available():
        model = model.cuda()
    dit.load_release_state(model, dit.read_release_checkpoint(DIT_WEIGHTS))
    return model.eval()


def _megatron_setup():
    from mugv_megatron.parallel import state as parallel

    if not parallel.is_initialized():
        parallel.setup(1)


def _te_status():
    """(available, reason) for the Transformer Engine spec."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (Transformer Engine runs on NVIDIA GPUs only)"
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the reason is printed, the part is skipped
        return False, f"transformer_engine does not import ({type(e).__name__}: {e})"
    return True, ""


def part_megatron_golden(args):
    import torch

    from tests.helpers import case_inputs, dit_vectors

    _megatron_setup()
    # float32 parity means float32 matmuls: no TF32 (~1e-3 relative) on the GPU's tensor cores.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    te_ok, te_reason = _te_status()
    rows, ok, skipped = [], True, []
    variants = [("megatron", torch.float32), ("sdpa", torch.float32)]
    if te_ok:
        variants.append(("te", torch.bfloat16))
    else:
        skipped.append(f"te spec: {te_reason}")
        log(f"  te spec: skipped: {te_reason}")
    for spec_name, dtype in variants:
        model = _megatron_golden_model(spec_name, dtype)
        for case in ("t2v", "i2v"):
            args_, kwargs = case_inputs(case)
            with torch.no_grad():
                out = model(
                    *(torch.as_tensor(a) for a in args_), **{k: torch.as_tensor(v) for k, v in kwargs.items()}
                ).cpu()
            want = dit_vectors()[f"{case}.out"]
            f32 = dtype == torch.float32
            err = _max_abs(out, want) if f32 else _rel_l2(out, want)
            bound = GOLDEN_ATOL if f32 else BF16_REL_L2
            good = err <= bound
            ok &= good
            rows.append(
                f"{spec_name}/{str(dtype).split('.')[-1]}/{case}: "
                f"{'max-abs' if f32 else 'rel-L2'} {err:.2e} (bound {bound:g})"
            )
            log("  " + rows[-1] + ("" if good else "  <-- FAIL"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return dict(status="ok" if ok else "failed", parity=rows, skipped=skipped, device=device)


GPU_LAUNCH = os.path.join(ROOT, "launch", "jax_gpu_slurm.sbatch")


def shipped_xla_flags(path=GPU_LAUNCH) -> dict:
    """The XLA GPU flags the GPU launch script exports, as compile options {name: value}."""
    import re

    with open(path) as fh:
        text = fh.read()
    block = re.search(r'export XLA_FLAGS="\$\{XLA_FLAGS:-(.*?)\}"', text, re.S)
    if not block:
        raise ValueError(f"{path}: no 'export XLA_FLAGS=\"${{XLA_FLAGS:-...}}\"' line to read the shipped flags from")
    flags = {}
    for name, value in re.findall(r"--(xla_\w+)=(\S+)", block.group(1).replace("\\\n", " ")):
        flags[name] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return flags


def _flag_options(flags: str) -> dict:
    if flags == "none":
        return {}
    if flags == "shipped":
        return shipped_xla_flags()
    raise ValueError(f"unknown XLA flag set {flags!r}; choose from {FLAG_SETS}")


def _jax_step_part(args, attention, remat=None, flags="none"):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench import profile_table
    from mugv import flops, geometry
    from mugv_jax.dit.model import RuntimeOptions
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.train import step as tr

    remat = remat or args.remat
    cfg = _step_config(args.dry_run, args.layers)
    latent, text_len, valid = _step_geometry(args.dry_run)
    n = geometry.num_tokens(latent, cfg)
    train_flops = _flops(cfg, latent, text_len)
    result = dict(
        backend=f"{attention}/remat={remat}/flags={flags}",
        layers=cfg.depth,
        hidden=cfg.hidden_size,
        tokens=n,
        model_tflop_per_step=train_flops / 1e12,
        device=_device_name_jax(),
    )
    peak_bytes, limit = _jax_peak_bytes()
    if attention == "xla":
        scores = cfg.num_heads * n * n * 4  # float32 logits of one layer, batch 1
        result["xla_scores_gib"] = scores / 2**30
        if limit and scores > 0.9 * limit:
            return dict(
                result,
                status="skipped",
                reason=f"unfused scores need {scores / 2**30:.0f} GiB per layer (device has {limit / 2**30:.0f} GiB)",
            )
    if attention == "cudnn" and args.dry_run:
        # No cuDNN here: lower the whole train step for CUDA and read the kernels it asks for.
        return _cudnn_step_lowering(args, cfg, latent, text_len, result, remat)

    mesh = mesh_lib.build_mesh({"data": -1}, devices=jax.local_devices()[:1])
    trainer = tr.Trainer(
        cfg,
        RuntimeOptions(attention=attention, compute_dtype=jnp.bfloat16, remat=remat),
        OptimConfig(learning_rate=1e-5, warmup_steps=0),
        ObjectiveConfig(i2v_prob=0.2, caption_dropout_prob=0.1),
        mesh,
    )
    rng = np.random.default_rng(0)
    f, h, w = latent
    batch = {
        "latents": rng.standard_normal((1, cfg.in_channels, f, h, w), np.float32),
        "y": rng.standard_normal((1, 1, text_len, cfg.text_dim), np.float32),
        "mask": (np.arange(text_len)[None] < valid).astype(np.int32),
        "fps": np.full((1,), 24.0, np.float32),
    }
    state = trainer.init_state(0)
    batch = trainer.put_batch(batch)
    step_fn, _, _ = trainer.abstract_step({k: (v.shape, v.dtype) for k, v in batch.items()})
    t0 = time.perf_counter()
    # The flag set as compile options: the same DebugOptions XLA_FLAGS sets, per variant.
    compiled = step_fn.lower(state, batch).compile(compiler_options=_flag_options(flags))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    loss = float(metrics["loss"])
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))  # the optimizer update too, not just the loss
        times.append(time.perf_counter() - t0)
    # The profile: separate steps, so the timed ones above carry no tracing overhead.
    trace_dir = os.path.join(getattr(args, "work", None) or tempfile.mkdtemp(), f"trace-{attention}-{remat}-{flags}")
    # The perfetto JSON when this jax can write it; profile_table reads the *.trace.json.gz otherwise.
    perfetto = "create_perfetto_trace" in inspect.signature(jax.profiler.trace).parameters
    with jax.profiler.trace(trace_dir, **({"create_perfetto_trace": True} if perfetto else {})):
        for _ in range(args.profile_steps):
            with jax.profiler.TraceAnnotation(profile_table.STEP_MARK):
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
    prof, ops = profile_table.profile_dir(trace_dir, compiled.as_text())
    step = sorted(times)[len(times) // 2]
    peak_bytes, limit = _jax_peak_bytes()
    peak = flops.peak_flops_for(jax.local_devices()[0].device_kind)
    mfu = flops.mfu(train_flops, step, 1, peak)
    log(profile_table.format_table(_profile_title(result, step, mfu), prof))
    return dict(
        result,
        status="ok" if math.isfinite(loss) else "failed",
        loss=loss,
        compile_s=compile_s,
        first_step_s=first,
        step_s=step,
        step_times_s=times,
        tflops=train_flops / step / 1e12,
        mfu=mfu,
        peak_gib=None if peak_bytes is None else peak_bytes / 2**30,
        profile=profile_table.as_dict(prof),
        ops=ops,
    )


def _profile_title(result, step_s, mfu):
    mfu_text = "-" if mfu is None else f"{100 * mfu:.1f} %"
    return f"  profile {result['backend']} on {result['device']}: step {step_s:.3f} s (timed, untraced), MFU {mfu_text}"


def _cudnn_step_lowering(args, cfg, latent, text_len, result, remat="full"):
    """The cuDNN train step of the trainer, lowered for CUDA (dry run): which kernels, no bias."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from mugv_jax.dit.model import RuntimeOptions
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.train import step as tr

    mesh = mesh_lib.build_mesh({"data": -1}, devices=jax.local_devices()[:1])
    trainer = tr.Trainer(
        cfg,
        RuntimeOptions(attention="cudnn", compute_dtype=jnp.bfloat16, remat=remat),
        OptimConfig(learning_rate=1e-5, warmup_steps=0),
        ObjectiveConfig(),
        mesh,
    )
    state = trainer.abstract_state()
    f, h, w = latent
    rep = NamedSharding(mesh, PartitionSpec())
    batch = {
        "latents": jax.ShapeDtypeStruct((1, cfg.in_channels, f, h, w), jnp.float32, sharding=rep),
        "y": jax.ShapeDtypeStruct((1, 1, text_len, cfg.text_dim), jnp.float32, sharding=rep),
        "mask": jax.ShapeDtypeStruct((1, text_len), jnp.int32, sharding=rep),
        "fps": jax.ShapeDtypeStruct((1,), jnp.float32, sharding=rep),
    }
    targets, masks = _cudnn_kernels_in(trainer._step_fn, state, batch)
    good = _padding_kernels_only(targets, masks, backward=True)
    log(f"  train step lowered for CUDA: kernels {targets}, mask types {masks}")
    return dict(result, status="ok" if good else "failed", lowered_kernels=targets, mask_types=masks)


class _Recompute:
    """Wraps a Megatron layer so its activations are recomputed in backward (remat "full")."""

    def __new__(cls, layer):
        import torch
        import torch.utils.checkpoint as ckpt

        class Recompute(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, hidden, inputs):
                return ckpt.checkpoint(self.inner, hidden, inputs, use_reentrant=False)

        return Recompute(layer)


def _torch_profile(args, step, cuda):
    """args.profile_steps steps under torch.profiler, bucketed like the JAX steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from bench import profile_table

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            with record_function(profile_table.STEP_MARK):
                step()
                if cuda:
                    torch.cuda.synchronize()
    path = os.path.join(getattr(args, "work", None) or tempfile.mkdtemp(), "megatron-step.trace.json")
    prof.export_chrome_trace(path)
    events = profile_table.load_events(path)
    return profile_table.bucket(events), profile_table.extract(events)


def part_megatron_step(args):
    import torch

    from bench import profile_table
    from mugv import flops, geometry
    from mugv_megatron.model.dit import MUGDiT
    from mugv_megatron.model.spec import get_layer_spec
    from mugv_megatron.model.transformer_config import make_transformer_config

    _megatron_setup()
    te_ok, te_reason = _te_status()
    cuda = torch.cuda.is_available()
    cfg = _step_config(args.dry_run, args.layers)
    latent, text_len, valid = _step_geometry(args.dry_run)
    spec_name = "te" if te_ok else "sdpa"
    dtype = torch.bfloat16 if cuda else torch.float32
    tc = make_transformer_config(cfg, params_dtype=dtype)
    model = MUGDiT(cfg, tc, get_layer_spec(use_te=te_ok, local_attention="sdpa"))
    for i, layer in enumerate(model.decoder.layers):
        model.decoder.layers[i] = _Recompute(layer)
    device = torch.device("cuda" if cuda else "cpu")
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    gen = torch.Generator().manual_seed(0)
    f, h, w = latent
    x = torch.randn(1, cfg.in_channels, f, h, w, generator=gen)
    inputs = dict(
        timestep=torch.tensor([500.0]),
        y=torch.randn(1, 1, text_len, cfg.text_dim, generator=gen),
        mask=(torch.arange(text_len)[None] < valid).long(),
        x_mask=torch.ones(1, f, dtype=torch.bool),
        fps=torch.tensor([24.0]),
    )
    target = torch.randn(1, cfg.in_channels, f, h, w, generator=gen).to(device)

    def step():
        out = model(x, **inputs)
        loss = (out[:, : cfg.in_channels] - target).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = float(step().detach())
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    train_flops = _flops(cfg, latent, text_len)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = flops.peak_flops_for(name) if cuda else None
    prof, ops = _torch_profile(args, step, cuda)
    mfu = flops.mfu(train_flops, step_s, 1, peak)
    log(
        profile_table.format_table(
            _profile_title(dict(backend=f"megatron/{spec_name}", device=name), step_s, mfu), prof
        )
    )
    return dict(
        status="ok" if math.isfinite(loss) else "failed",
        backend=f"megatron/{spec_name}",
        profile=profile_table.as_dict(prof),
        ops=ops,
        note="" if te_ok else f"TE spec skipped: {te_reason}",
        layers=cfg.depth,
        hidden=cfg.hidden_size,
        tokens=geometry.num_tokens(latent, cfg),
        model_tflop_per_step=train_flops / 1e12,
        loss=loss,
        compile_and_first_step_s=first,
        step_s=step_s,
        step_times_s=times,
        tflops=train_flops / step_s / 1e12,
        mfu=mfu,
        device=name,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    )


def part_megatron_distopt(args):
    """The Megatron GPU training path end to end (bench/megatron_distopt.py): 10B-width layers
    with the DistributedOptimizer, bf16 parameters + fp32 main weights, full recompute, both
    overlaps; two steps, an async save, a step, a restore into a fresh trainer, compared."""
    from bench import megatron_distopt
    from mugv_megatron.parallel import distopt_cpu

    if args.dry_run:  # CPU: tiny width, megatron's optimizer under the shim
        distopt_cpu.apply()

    work = getattr(args, "work", None) or tempfile.mkdtemp(prefix="device-check-distopt-")
    got = megatron_distopt.run(
        os.path.join(work, "distopt"),
        model="tiny" if args.dry_run else "10b",
        bucket_size=200_000 if args.dry_run else None,
    )
    ok = got.get("step3_loss_restored") == got.get("step3_loss")
    return dict(
        status="ok" if ok else "failed",
        backend="megatron/distopt",
        note=str(got)[:300],
        **{k: got[k] for k in ("model",) if k in got},
    )


def geometry_check(args):
    """Shapes and arguments of the real 720p step, traced on any machine (no device work)."""
    import jax
    import jax.numpy as jnp

    from mugv import geometry
    from mugv_jax.parallel import attention
    from mugv_jax.parallel import context_parallel as cp

    cfg = _step_config(False, args.layers)
    n = geometry.num_tokens(LATENT_720P, cfg)
    assert n == 50_402, n
    flop = _flops(cfg, LATENT_720P, TEXT_TOKENS)
    log(
        f"  720p×5 s: latent {LATENT_720P} → {n} tokens; {cfg.depth} layers of hidden "
        f"{cfg.hidden_size}: {flop / 1e12:.1f} model TFLOP per train step (batch 1)"
    )
    log(f"  xla attention: unfused float32 scores {cfg.num_heads * n * n * 4 / 2**30:.0f} GiB per layer")
    q = jax.ShapeDtypeStruct((1, n, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    kt = jax.ShapeDtypeStruct((1, TEXT_TOKENS, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    import numpy as np

    text_mask = np.arange(TEXT_TOKENS)[None] < VALID_TEXT  # numpy: no device is touched
    with _pretend_cuda():
        jax.eval_shape(
            lambda q, k: attention.dot_product_attention(q, k, k, key_mask=text_mask, implementation="cudnn"), q, kt
        )
        jax.eval_shape(lambda q: cp.self_attention(q, q, q, implementation="cudnn"), q)
    log("  cudnn arguments at 720p pass JAX's checks (self- and cross-attention, no bias)")
    return dict(status="ok", tokens=n, model_tflop_per_step=flop / 1e12)


def _variant_part(name, args):
    attention, remat, flags = VARIANTS[name]
    # The baseline steps take --remat; the other variants name their own policy.
    return _jax_step_part(args, attention, None if name.startswith("jax_step_") else remat, flags)


PART_FUNCS = {
    "jax_golden": part_jax_golden,
    "megatron_golden": part_megatron_golden,
    **{name: functools.partial(_variant_part, name) for name in VARIANTS},
    "megatron_step": part_megatron_step,
    "megatron_distopt": part_megatron_distopt,
}


# --- driver --------------------------------------------------------------------------------------


def run_inline(name, args):
    t0 = time.perf_counter()
    try:
        result = PART_FUNCS[name](args)
    except Exception as e:  # noqa: BLE001 - one part's failure is its row, the others still run
        traceback.print_exc()
        result = dict(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
    result["wall_s"] = time.perf_counter() - t0
    return result


def run_isolated(name, args, timeout):
    """The part in a fresh python process (its own device memory), its output streamed, stopped
    after `timeout` seconds."""
    import threading

    out = os.path.join(args.work, f"{name}.json")
    cmd = [
        sys.executable,
        "-u",
        os.path.abspath(__file__),
        "--part",
        name,
        "--json",
        out,
        "--layers",
        str(args.layers),
        "--steps",
        str(args.steps),
        "--remat",
        args.remat,
        "--profile-steps",
        str(args.profile_steps),
        "--work",
        args.work,
    ] + (["--dry-run"] if args.dry_run else [])
    # One compilation cache for all parts: XLA's autotuning results (kept there) are shared by the
    # variants, so only the first one pays for them.
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.work, "jax-cache"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    reader = threading.Thread(target=lambda: [log("  | " + line.rstrip()) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(5)
        return dict(status="timeout", reason=f"stopped after {timeout:.0f} s", wall_s=time.perf_counter() - t0)
    reader.join(5)
    if os.path.exists(out):
        with open(out) as fh:
            result = json.load(fh)
    else:
        result = dict(status="failed", reason=f"exit code {proc.returncode}; no result written")
    result["wall_s"] = time.perf_counter() - t0
    return result


def _fmt(v, spec, width):
    return f"{'-':>{width}}" if v is None else format(v, spec).rjust(width)


def table(results):
    head = f"{'part':<32} {'backend':<40} {'status':<8} {'step s':>8} {'TFLOP/s':>8} {'MFU %':>6} {'peak GiB':>9}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(
            f"{name:<32} {str(r.get('backend', '')):<40} {r['status']:<8} "
            f"{_fmt(r.get('step_s'), '.3f', 8)} {_fmt(r.get('tflops'), '.1f', 8)} "
            f"{_fmt(mfu, '.1f', 6)} {_fmt(r.get('peak_gib'), '.1f', 9)}"
        )
        for key in ("reason", "note"):
            if r.get(key):
                lines.append(f"{'':<32} {r[key]}")
    return "\n".join(lines)


def _write_atomic(path, text):
    """Written under a temporary name and renamed when complete (gzip-compressed for a .gz path)."""
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt") if path.endswith(".gz") else open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, in-process, seconds")
    ap.add_argument("--layers", type=int, default=4, help="10B-width layers in the step parts (2-4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after the first (default 3; 1 with --dry-run)")
    ap.add_argument("--profile-steps", type=int, default=None, help="profiled steps per step part (default 1)")
    ap.add_argument(
        "--remat", default="full", help="JAX remat policy of jax_step_xla/jax_step_cudnn (10B configs: full)"
    )
    ap.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help="comma-separated parts, or 'all' (every variant); choose from " + ",".join(PARTS),
    )
    ap.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds for the whole GPU run: no part starts past it"
    )
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="directory for the log and JSON")
    ap.add_argument(
        "--isolate",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="one process per part (default: on, except with --dry-run)",
    )
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 1 if args.dry_run else 2
    if args.profile_steps is None:
        args.profile_steps = 1
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:
        # JAX takes 75% of the GPU up front by default; the parts share the device with torch.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    if args.part:  # a child process: one part, result as JSON
        result = run_inline(args.part, args)
        _write_atomic(args.json, json.dumps(result, indent=1, default=str))
        return 0

    parts = list(PARTS) if args.parts == "all" else [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    isolate = (not args.dry_run) if args.isolate is None else args.isolate
    buffer = io.StringIO()
    tee = _Tee(sys.stdout, buffer)
    with contextlib.redirect_stdout(tee):
        log(
            f"device check ({'dry run, CPU' if args.dry_run else 'GPU'}): {platform.node()}, "
            f"python {platform.python_version()}, {_versions()}"
        )
        results = {}
        log("[geometry] 720p×5 s step arguments")
        results["geometry"] = run_inline_geometry(args)
        # The budget counts from device_check.sh's start: installing Transformer Engine is in it.
        start = float(os.environ.get("DEVICE_CHECK_STARTED") or time.time())
        with tempfile.TemporaryDirectory(prefix="device-check-") as work:
            args.work = work
            for name in parts:
                log(f"[{name}]")
                left = args.budget - (time.time() - start)
                if isolate and left < MIN_PART_S:
                    results[name] = dict(
                        status="skipped",
                        reason=f"the --budget of {args.budget:.0f} s is spent; run it alone with --parts {name}",
                        wall_s=0.0,
                    )
                elif isolate:
                    results[name] = run_isolated(name, args, min(TIMEOUTS[name], left))
                    if results[name]["status"] == "timeout" and left < TIMEOUTS[name]:
                        results[name]["reason"] += f" (the end of the --budget; alone: --parts {name})"
                else:
                    results[name] = run_inline(name, args)
                log(f"  -> {results[name]['status']} in {results[name]['wall_s']:.1f} s")
        log("")
        log(table(results))
    # The profiled ops go to their own file (bench/profile_table.py re-buckets them on any machine).
    ops = {name: r.pop("ops") for name, r in results.items() if r.get("ops")}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        if ops:
            _write_atomic(os.path.join(args.out, "device_check_ops.json.gz"), json.dumps(ops))
        _write_atomic(os.path.join(args.out, "device_check.json"), json.dumps(results, indent=1, default=str))
        _write_atomic(os.path.join(args.out, "device_check.log"), buffer.getvalue())
    bad = [n for n, r in results.items() if r["status"] in ("failed", "timeout")]
    return 1 if bad else 0


def run_inline_geometry(args):
    t0 = time.perf_counter()
    try:
        result = geometry_check(args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        result = dict(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
    result["wall_s"] = time.perf_counter() - t0
    return result


def _versions():
    out = []
    for mod in ("jax", "torch", "megatron.core", "transformer_engine"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - absent packages are reported, not fatal
            out.append(f"{mod} absent")
    return ", ".join(out)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


if __name__ == "__main__":
    sys.exit(main())
