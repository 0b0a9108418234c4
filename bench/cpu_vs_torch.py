"""JAX against torch on the CPU: the same weights on one pinned core, outputs and gradients compared first.

    python bench/cpu_vs_torch.py                                  # DiT, train step, VAE (release VAE at 64²)
    python bench/cpu_vs_torch.py --preset tiny --repeats 1 --vae tiny:16 --fast-compile   # smoke test (tested)
    python bench/cpu_vs_torch.py --parts vae --vae release:128,release:256
    python bench/cpu_vs_torch.py --parts dit --allocator system      # glibc's default allocator

Sides, all built from one set of release-layout weights:
  dit   jax             mugv_jax.dit.forward under jax.jit, float32, remat per --jax-remat
        torch/sdpa      bench/torch_dit.py (our plain-torch DiT), torch's fused CPU attention
        torch/math      the same, softmax(q·kᵀ)·v written out
        megatron/sdpa   mugv_megatron's MUGDiT, local spec, torch SDPA core attention
        megatron/local  the same with megatron's own core attention
  step  jax             mugv_jax.train.step.Trainer.train_step (clip, AdamW, EMA; one device)
        megatron/*      mugv_megatron.train.step.Trainer.train_step (torch AdamW), both attentions
  vae   jax             mugv_jax.vae.JittedVAE encode / decode of 8 frames, one frame per 2D call
        torch           bench/torch_vae.py (our plain-torch VAE), the same calls

All parts run in one process pinned to one core (`taskset`, --core), every side single-threaded
(XLA's Eigen pool and torch's intra-op pool at 1 thread). The sides are timed in turn, call after
call, so on a shared machine each sees the same load; times are CPU seconds of the process per
call (median of --repeats; the first call, which compiles for JAX, is shown apart), wall seconds
beside them. The process's glibc keeps the memory it frees (--allocator keep, the default; `system`
for glibc's defaults): otherwise XLA's one temp buffer per call is mapped and faulted in afresh each
call, a cost of the allocator rather than of either side's code. Before any time is printed, every
side's outputs (and, for the DiT, its gradients per release tensor) are compared with a torch
side's: a disagreement beyond OUT_ATOL / GRAD_REL / VAE_REL fails the run. The DiT loss for the
backward is Σ out·r / numel(out) with a fixed random r.
Ratio = JAX ÷ side: below 1, JAX is faster. Results: docs/benchmarks.md ("JAX against torch on the CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Output agreement (float32): the golden vectors' bound. Gradients: per release tensor, max |Δ|
# relative to the tensor's largest entry, as tests/cross_backend/test_cross_backend_training.py.
OUT_ATOL = 1e-4
GRAD_REL = 1e-4
# The VAE's outputs relative to their range (the random-init decoder reaches ~20).
VAE_REL = 1e-4

DIT_PRESETS = {
    # The golden vectors' config; 2 samples of 3×8×12 latents (72 tokens each): seconds, for the test.
    "tiny": dict(model=dict(depth=2, hidden_size=144, num_heads=2, text_dim=64, max_text_tokens=16),
                 latent=(3, 8, 12), batch=2, text=16, valid=(10, 16)),
    # 8 heads of 72 (the release's head dim), 4 layers, one sample of 5×16×24 latents (480 tokens).
    "small": dict(model=dict(depth=4, hidden_size=576, num_heads=8, text_dim=512, max_text_tokens=64),
                  latent=(5, 16, 24), batch=1, text=64, valid=(40,)),
}  # fmt: skip
TORCH_DIT = ("torch/sdpa", "torch/math", "megatron/sdpa", "megatron/local")
MEGATRON_ATTENTION = {"megatron/sdpa": "sdpa", "megatron/local": "megatron"}
PARTS = ("dit", "step", "vae")


def log(*a):
    print(*a, flush=True)


def _median(v):
    s = sorted(v)
    return s[len(s) // 2]


# --- the part's process ------------------------------------------------------------------------


def _single_thread_env(fast_compile: bool):
    # Every token a --flag: XLA stops reading XLA_FLAGS at a bare word (the TensorFlow option
    # `intra_op_parallelism_threads=1` stood here and silently dropped --fast-compile's flag).
    flags = "--xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags + (" --xla_backend_optimization_level=0" if fast_compile else "")
    os.environ["JAX_PLATFORMS"] = "cpu"
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = "1"


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ALLOCATORS = ("keep", "system")


def keep_freed_memory():
    """glibc keeps what the process frees for its next allocation: one arena, no block of its own
    mapped per large allocation, nothing trimmed. XLA's CPU client allocates each call's
    temporaries as one buffer (191 MB for the small DiT's forward+backward) from a worker thread;
    by default glibc maps it fresh and unmaps it every call: ~50,000 page faults, ~10% of the
    call (docs/benchmarks.md). torch's per-op buffers fault no pages either way. Must run before
    the process starts threads (their arenas are fixed then): the child calls it first."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError) as e:
        raise SystemExit(  # noqa: B904 (a one-line refusal, not a traceback)
            f"--allocator keep needs glibc's mallopt ({name or 'no libc found'}: {e}); use --allocator system"
        )
    for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)):
        if mallopt(param, ctypes.c_int(value)) != 1:
            raise SystemExit(f"--allocator keep: mallopt({param}, {value}) refused; use --allocator system")


FIRST: dict = {}  # (side, phase) → seconds of its first call (a JAX compile included)


def first_call(side, phase, fn):
    """fn() timed as the first call of (side, phase)."""
    t0 = time.perf_counter()
    out = fn()
    FIRST[side, phase] = time.perf_counter() - t0
    return out


def interleaved(sides: dict, phases, repeats: int) -> dict:
    """{side: {phase: {first, cpu[], wall[]}}}: one warm-up call per (side, phase), then `repeats`
    rounds over every side in turn."""
    times = {s: {} for s in sides}
    for s, calls in sides.items():
        for p in phases:
            calls[p]()
            times[s][p] = dict(first=FIRST.get((s, p)), cpu=[], wall=[])
    for _ in range(repeats):
        for p in phases:
            for s, calls in sides.items():
                c0, w0 = time.process_time(), time.perf_counter()
                calls[p]()
                times[s][p]["cpu"].append(time.process_time() - c0)
                times[s][p]["wall"].append(time.perf_counter() - w0)
    return times


def _dit_config(preset):
    from mugv.config import DiTConfig

    return DiTConfig(**DIT_PRESETS[preset]["model"])


def _dit_inputs(preset):
    import numpy as np

    p = DIT_PRESETS[preset]
    cfg = _dit_config(preset)
    rng = np.random.default_rng(1)
    b, (f, h, w) = p["batch"], p["latent"]
    inputs = dict(
        x=rng.standard_normal((b, cfg.in_channels, f, h, w), np.float32),
        timestep=np.linspace(100.0, 900.0, b).astype(np.float32),
        y=rng.standard_normal((b, 1, p["text"], cfg.text_dim), np.float32),
        mask=(np.arange(p["text"])[None] < np.asarray(p["valid"])[:, None]).astype(np.int32),
        x_mask=np.ones((b, f), bool),
        fps=np.full((b,), 24.0, np.float32),
    )
    return inputs, rng.standard_normal((b, cfg.out_channels, f, h, w), np.float32)


def dit_weights(preset) -> dict:
    """Release-layout float32 weights: the torch DiT's own initialisation, seed 0."""
    import torch

    from bench.torch_dit import TorchDiT

    torch.manual_seed(0)
    return {k: v.numpy().copy() for k, v in TorchDiT(_dit_config(preset)).state_dict().items()}


def _nested(flat):
    from mugv.layouts.jax import unflatten

    return unflatten(flat)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def _megatron_model(cfg, state, attention):
    import torch

    from mugv_megatron.model import build
    from mugv_megatron.model.dit import MUGDiT
    from mugv_megatron.model.spec import get_layer_spec
    from mugv_megatron.model.transformer_config import make_transformer_config

    tc = make_transformer_config(cfg, params_dtype=torch.float32, perform_initialization=False)
    model = MUGDiT(cfg, tc, get_layer_spec(use_te=False, local_attention=MEGATRON_ATTENTION[attention]))
    build.load_release_state(model, state)
    return model


def part_dit(args):
    """({side: {phase: callable}}, {side: (output, {release name: gradient})})."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from bench.torch_dit import TorchDiT
    from mugv.layouts import jax as jax_layout
    from mugv.layouts import megatron as mlayout
    from mugv_jax.dit import checkpoint as ckpt
    from mugv_jax.dit.model import RuntimeOptions, forward
    from mugv_megatron.parallel import state as parallel

    cfg = _dit_config(args.preset)
    inputs, r = _dit_inputs(args.preset)
    weights = dit_weights(args.preset)
    sides, results = {}, {}

    params = jax.device_put(
        _nested({k: jnp.asarray(v) for k, v in ckpt.params_from_release_items(weights.items(), cfg).items()})
    )
    x = {k: jnp.asarray(v) for k, v in inputs.items()}
    rj = jnp.asarray(r)
    for remat in args.jax_remat.split(","):
        opts = RuntimeOptions(remat=remat)
        fwd = jax.jit(lambda p, x, opts=opts: forward(p, cfg, opts, **x))
        grad = jax.jit(jax.value_and_grad(lambda p, x, opts=opts: jnp.sum(forward(p, cfg, opts, **x) * rj) / rj.size))
        name = "jax" if remat == "none" else f"jax/remat={remat}"
        sides[name] = {
            "forward": lambda fwd=fwd: jax.block_until_ready(fwd(params, x)),
            "forward+backward": lambda grad=grad: jax.block_until_ready(grad(params, x)),
        }
        out = first_call(name, "forward", lambda fwd=fwd: jax.block_until_ready(fwd(params, x)))
        _, g = first_call(name, "forward+backward", lambda grad=grad: jax.block_until_ready(grad(params, x)))
        flat = {k: np.asarray(v) for k, v in _flat(g).items()}
        results[name] = (np.asarray(out), dict(jax_layout.jax_to_release_all(flat, cfg)))

    torch.set_num_threads(1)
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    tx = {k: torch.from_numpy(v) for k, v in inputs.items()}
    rt = torch.from_numpy(r)
    parallel.setup(1)
    for name in TORCH_DIT:
        if name.startswith("torch/"):
            model = TorchDiT(cfg, attention=name.split("/")[1])
            model.load_state_dict(state)
            to_release = lambda g: g
        else:
            model = _megatron_model(cfg, state, name)
            to_release = lambda g: mlayout.megatron_state_to_release(g, cfg)

        def fwd(model=model):
            with torch.no_grad():
                return model(**tx)

        def fwd_bwd(model=model):
            model.zero_grad(set_to_none=True)
            (torch.sum(model(**tx) * rt) / rt.numel()).backward()

        first_call(name, "forward+backward", fwd_bwd)
        grads = to_release({n: p.grad.numpy().copy() for n, p in model.named_parameters()})
        results[name] = (first_call(name, "forward", fwd).numpy(), {k: np.asarray(v) for k, v in grads.items()})
        sides[name] = {"forward": fwd, "forward+backward": fwd_bwd}
    return sides, results


def _step_batch(preset):
    inputs, _ = _dit_inputs(preset)
    return {"latents": inputs["x"], "y": inputs["y"], "mask": inputs["mask"], "fps": inputs["fps"]}


def part_step(args):
    import jax
    import torch

    from mugv.training import ObjectiveConfig, OptimConfig
    from mugv_jax.dit import checkpoint as ckpt
    from mugv_jax.dit.model import RuntimeOptions
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.train import step as jtr
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train.step import Trainer as MegatronTrainer

    cfg = _dit_config(args.preset)
    batch = _step_batch(args.preset)
    weights = dit_weights(args.preset)
    optim, objective = OptimConfig(learning_rate=1e-4, warmup_steps=0), ObjectiveConfig()
    sides, losses = {}, {}

    mesh = mesh_lib.build_mesh({"data": -1}, devices=jax.local_devices()[:1])
    for remat in args.jax_remat.split(","):
        trainer = jtr.Trainer(cfg, RuntimeOptions(remat=remat), optim, objective, mesh)
        holder = {"state": trainer.init_state(0, _nested(ckpt.params_from_release_items(weights.items(), cfg)))}
        placed = trainer.put_batch(batch)
        name = "jax" if remat == "none" else f"jax/remat={remat}"
        log_losses = losses.setdefault(name, [])

        def step(trainer=trainer, holder=holder, placed=placed, log_losses=log_losses):
            holder["state"], m = trainer.train_step(holder["state"], placed)
            log_losses.append(float(m["loss"]))  # waits for the whole step, as the trainer's log does

        sides[name] = {"train step": step}

    torch.set_num_threads(1)
    parallel.setup(1)
    for name in MEGATRON_ATTENTION:
        trainer = MegatronTrainer(
            cfg,
            optim,
            objective,
            seed=0,
            release_state={k: torch.from_numpy(v) for k, v in weights.items()},
            use_megatron_optimizer=False,
            local_attention=MEGATRON_ATTENTION[name],
        )
        log_losses = losses.setdefault(name, [])
        sides[name] = {
            "train step": lambda t=trainer, lg=log_losses: lg.append(float(t.train_step(dict(batch))["loss"]))
        }
    return sides, losses


def _vae_spec(spec):
    """'release:128' → ('release', 128): that VAE on 8 frames of 128×128."""
    preset, _, size = spec.partition(":")
    return preset, int(size or 64)


def vae_weights(preset):
    import torch

    from bench.torch_vae import TorchVAE
    from mugv.vae_config import get_vae_config

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in TorchVAE(get_vae_config(preset)).state_dict().items()}


def part_vae(args):
    import jax
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import mugv_jax.vae as vae
    from bench.torch_vae import TorchVAE
    from mugv.vae_config import get_vae_config

    preset, size = _vae_spec(args.vae_spec)
    cfg = get_vae_config(preset, micro_batch_size=1)
    weights = vae_weights(preset)
    path = os.path.join(args.work, f"vae_{preset}.safetensors")
    save_file(weights, path)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 8, size, size)).astype(np.float32)

    jvae = vae.jit(vae.load(path, cfg))
    torch.set_num_threads(1)
    tvae = TorchVAE(cfg).eval()
    tvae.load_state_dict(weights)
    xt = torch.from_numpy(x)
    out = {}

    def jax_encode():
        out["jax.z"] = jax.block_until_ready(jvae.encode(x))

    def jax_decode():
        out["jax.recon"] = jax.block_until_ready(jvae.decode(out["jax.z"], 8))

    @torch.no_grad()
    def torch_encode():
        out["torch.z"] = tvae.encode(xt)

    @torch.no_grad()
    def torch_decode():
        out["torch.recon"] = tvae.decode(out["torch.z"])

    sides = {
        "torch": {"encode": torch_encode, "decode": torch_decode},
        "jax": {"encode": jax_encode, "decode": jax_decode},
    }
    for name, calls in sides.items():
        first_call(name, "encode", calls["encode"])
        first_call(name, "decode", calls["decode"])
    results = {s: {k: np.asarray(out[f"{s}.{k}"]) for k in ("z", "recon")} for s in sides}
    return sides, results


# --- agreement ---------------------------------------------------------------------------------


def check_dit(results, ref="torch/sdpa"):
    import numpy as np

    want_out, want_grads = results[ref]
    lines, ok = [], True
    for side, (out, grads) in results.items():
        if side == ref:
            continue
        out_err = float(np.max(np.abs(out.astype(np.float64) - want_out)))
        worst, worst_name = 0.0, ""
        for k, g in want_grads.items():
            err = float(np.max(np.abs(grads[k].astype(np.float64) - g))) / max(float(np.max(np.abs(g))), 1e-30)
            if err > worst:
                worst, worst_name = err, k
        good = out_err <= OUT_ATOL and worst <= GRAD_REL
        ok &= good
        lines.append(
            f"  {side:<16} vs {ref}: output max|Δ| {out_err:.2e} (≤ {OUT_ATOL:g}), gradients max|Δ|/max|g| "
            f"{worst:.2e} (≤ {GRAD_REL:g}, {worst_name}){'' if good else '  <-- MISMATCH'}"
        )
    return ok, lines


def check_vae(results, ref="torch"):
    import numpy as np

    lines, ok = [], True
    for side, arrays in results.items():
        if side == ref:
            continue
        for k, got in arrays.items():
            want = results[ref][k].astype(np.float64)
            err = float(np.max(np.abs(got - want))) / float(np.max(np.abs(want)))
            ok &= err <= VAE_REL
            lines.append(
                f"  {side:<6} vs {ref}: {k} max|Δ|/max|ref| {err:.2e} (≤ {VAE_REL:g})"
                + ("" if err <= VAE_REL else "  <-- MISMATCH")
            )
    return ok, lines


def check_step(losses, ref="megatron/sdpa"):
    """The first step's loss: every side draws the same noise and timesteps (mugv.rng)."""
    first = {s: v[0] for s, v in losses.items()}
    ok = all(abs(v - first[ref]) <= 1e-5 * abs(first[ref]) for v in first.values())
    line = "  first-step loss: " + ", ".join(f"{s} {v:.7f}" for s, v in first.items())
    return ok, [line + ("" if ok else "  <-- MISMATCH (relative 1e-5)")]


def run_job(args, job):
    """One part in this (pinned) process: build the sides, check them, time them."""
    part, _, spec = job.partition(":")
    if part == "dit":
        sides, results = part_dit(args)
        ok, lines = check_dit(results)
        phases = ("forward", "forward+backward")
    elif part == "step":
        sides, losses = part_step(args)
        for name, calls in sides.items():
            first_call(name, "train step", calls["train step"])  # its loss is compared
        ok, lines = check_step(losses)
        phases = ("train step",)
    else:
        args.vae_spec = spec
        sides, results = part_vae(args)
        ok, lines = check_vae(results)
        phases = ("encode", "decode")
    times = interleaved(sides, phases, args.repeats) if ok else {}
    return dict(ok=ok, agreement=lines, times=times, phases=phases)


def run_jobs(args):
    """Every job in one process (imports once), each result a `RESULT {json}` line on stdout."""
    for job in args.child.split(","):
        print("RESULT " + json.dumps(dict(job=job, **run_job(args, job))), flush=True)


# --- the driver ----------------------------------------------------------------------------------


def table(title, times, phases):
    """Per phase and side: first call, CPU and wall seconds (medians), JAX ÷ side for each JAX side."""
    jax_sides = [s for s in times if s.startswith("jax")]
    head = f"  {'phase':<17} {'side':<16} {'first s':>8} {'CPU s':>8} {'wall s':>8}"
    head += "".join(f" {s + ' ÷':>{max(9, len(s) + 2)}}" for s in jax_sides)
    lines = [title, head]
    for phase in phases:
        for side, t in times.items():
            t = t[phase]
            cpu = _median(t["cpu"])
            first = "" if t["first"] is None else f"{t['first']:8.3f}"
            row = f"  {phase:<17} {side:<16} {first:>8} {cpu:8.3f} {_median(t['wall']):8.3f}"
            for j in jax_sides:
                ratio = "" if side.startswith("jax") else f"{_median(times[j][phase]['cpu']) / cpu:.2f}"
                row += f" {ratio:>{max(9, len(j) + 2)}}"
            lines.append(row)
    return "\n".join(lines)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"


def _versions():
    out = subprocess.run(
        [sys.executable, "-c", "import jax, torch; print(f'jax {jax.__version__}, torch {torch.__version__}')"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def spawn(args, jobs):
    """The jobs in one child process pinned to --core; {job: result}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(jobs), "--work", args.work]
    cmd += ["--preset", args.preset, "--repeats", str(args.repeats), "--jax-remat", args.jax_remat]
    cmd += ["--fast-compile"] if args.fast_compile else []
    cmd += ["--allocator", args.allocator]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(args.core), *cmd]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or len(results) != len(jobs):
        raise SystemExit(f"bench child failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return {r.pop("job"): r for r in results}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--preset", default="small", choices=sorted(DIT_PRESETS), help="DiT width and geometry")
    ap.add_argument("--jax-remat", default="none", help="JAX remat policies to time, comma-separated")
    ap.add_argument("--vae", default="release:64", help="VAE preset:frame size, comma-separated (8 frames each)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    ap.add_argument("--core", type=int, default=os.cpu_count() - 1, help="core to pin each part's process to")
    ap.add_argument("--out", default="", help="directory for report.txt and results.json")
    ap.add_argument(
        "--fast-compile",
        action="store_true",
        help="XLA without LLVM optimisation: faster compiles, slower runs (a smoke test, not a measurement)",
    )
    ap.add_argument(
        "--allocator",
        default="keep",
        choices=ALLOCATORS,
        help="keep: glibc keeps freed memory for every side (XLA maps a fresh temp buffer per call "
        "otherwise); system: glibc's defaults",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.allocator == "keep":
            keep_freed_memory()
        _single_thread_env(args.fast_compile)
        run_jobs(args)
        return 0
    parts = [p for p in args.parts.split(",") if p]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"unknown parts {bad}; choose from {list(PARTS)}")
    if not 0 <= args.core < os.cpu_count():
        ap.error(f"--core {args.core}: this machine has cores 0..{os.cpu_count() - 1}")

    report, ok, summary = [], True, {}

    def say(line=""):
        log(line)
        report.append(line)

    say(f"bench/cpu_vs_torch.py on {machine()}; {_versions()}")
    say(f"all parts in one process pinned to core {args.core}, every side single-threaded, float32")
    say(
        "allocator: glibc keeps freed memory, for every side (--allocator keep)"
        if args.allocator == "keep"
        else "allocator: glibc's defaults (--allocator system): each JAX call maps its temp buffer afresh"
    )
    if args.fast_compile:
        say("--fast-compile: XLA's LLVM optimisation off, so the JAX times are NOT representative")
    if "dit" in parts or "step" in parts:
        p = DIT_PRESETS[args.preset]
        say(f"DiT {args.preset}: {p['model']}, latent {p['latent']} × batch {p['batch']}, {p['text']} caption tokens")
    jobs = [part for part in ("dit", "step") if part in parts]
    if "vae" in parts:
        jobs += [f"vae:{spec}" for spec in args.vae.split(",") if spec]
    with tempfile.TemporaryDirectory(prefix="cpu-vs-torch-") as work:
        args.work = work
        got = spawn(args, jobs)
    for job in jobs:
        title = job.replace(":", " ", 1)
        say(f"{title}: agreement")
        for line in got[job]["agreement"]:
            say(line)
        ok &= got[job]["ok"]
        if got[job]["ok"]:
            say(
                table(
                    f"{title} (CPU s per call; JAX ÷ side below 1: JAX faster)", got[job]["times"], got[job]["phases"]
                )
            )
        summary[title] = got[job]
    if not ok:
        say("FAILED: the sides disagree (see above); no times compared")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, text in (("report.txt", "\n".join(report) + "\n"), ("results.json", json.dumps(summary, indent=1))):
            with open(os.path.join(args.out, name + ".tmp"), "w") as fh:
                fh.write(text)
            os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
