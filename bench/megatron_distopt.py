"""The GPU check of the Megatron trainer's CUDA path (what the CPU tests cannot run).

    python bench/megatron_distopt.py --workdir /tmp/mgpu_check                 # one GPU (DP = 1)
    torchrun --nproc_per_node 8 bench/megatron_distopt.py --workdir /tmp/x      # DP = 8

(both need CUDA GPUs), or `run(workdir)` from a bench script (bench/device_check.py's
`megatron_distopt` part). On the 10B width (hidden 3456,
48 heads, MLP 13824) with two layers (about 0.5 B parameters): megatron DDP + DistributedOptimizer
with bf16 parameters and fp32 main weights, bf16 compute, full activation recompute, overlapped
grad reduce-scatter and param all-gather (about a dozen 40M-element buckets), per-sample draws on
the device. It takes two steps, starts an async save, takes a third step while the writer runs,
publishes the save, restores it into a fresh trainer and checks it holds the state at the save,
then runs the third step on the restored trainer and compares. Raises AssertionError naming the
first failed check; prints (and returns) the measured numbers. Needs about 20 GB of GPU memory and
10 GB of disk; a few minutes on one H100/H200, most of it the save.

The CPU tests (tests/mugv_megatron/test_megatron_distopt.py, under mugv_megatron.parallel.distopt_cpu) already check the
optimizer's math against torch AdamW, the checkpoint's layout and DP resharding; this adds what
only CUDA has: NCCL collectives overlapped on their stream, TE's fused Adam (when Transformer
Engine is installed), bf16 kernels, the forked async writer staging GPU tensors, CUDA draws.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch

# Run as a script (`python bench/megatron_distopt.py`): the repository root holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mugv.training import ObjectiveConfig, OptimConfig  # noqa: E402

LATENT = (4, 16, 16)  # T, H, W per sample: 4·8·8 = 256 video tokens
TEXT_LEN = 64


def _batch(cfg, dp_size: int, per_rank: int, step: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(100 + step)
    b, text = dp_size * per_rank, min(TEXT_LEN, cfg.max_text_tokens)
    return {
        "latents": rng.standard_normal((b, cfg.in_channels, *LATENT), dtype=np.float32),
        "y": rng.standard_normal((b, 1, text, cfg.text_dim), dtype=np.float32),
        "mask": np.ones((b, text), dtype=np.int64),
        "fps": np.full((b,), 24.0, dtype=np.float32),
    }


def _init_distributed() -> None:
    """torchrun's world (NCCL on GPU), or a one-process one."""
    from mugv_megatron.parallel import state as parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.distributed.is_initialized():
        parallel.setup(1, rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size())
    else:
        parallel.setup(1)


def _digest(t: torch.Tensor) -> str:
    """A hash of the float32 bit patterns: the state at the save is compared with the restored
    one without holding both in host memory (0.5 B parameters: weights, main weights, moments,
    EMA)."""
    array = t.detach().float().cpu().contiguous().numpy()
    return hashlib.blake2b(memoryview(array).cast("B"), digest_size=16).hexdigest()


def _state_digests(trainer) -> dict:
    out = {f"weight.{n}": _digest(p) for n, p in trainer.module.named_parameters()}
    for n, per in trainer.optimizer.full_states().items():
        out.update({f"{k}.{n}": _digest(t) for k, t in per.items()})
    out.update({f"ema.{n}": _digest(t) for n, t in trainer.ema.full_state().items()})
    return out


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"device check failed: {what}")


def run(
    workdir: str,
    *,
    per_rank_batch: int = 2,
    model: str = "10b",
    depth: int = 2,
    bucket_size: int | None = None,
    keep_files: bool = False,
) -> dict:
    """`model`/`depth`: the width to check and its layer count. Without CUDA it runs only under
    mugv_megatron.parallel.distopt_cpu (tests/mugv_megatron/test_megatron_distopt.py runs it that way, tiny, to keep the
    script itself working); the GPU-only parts are then skipped."""
    from mugv.config import get_config
    from mugv_megatron.parallel import distopt_cpu
    from mugv_megatron.train import checkpointing
    from mugv_megatron.train.step import Trainer

    on_gpu = torch.cuda.is_available()
    _check(on_gpu or distopt_cpu.is_applied(), "CUDA is not available")
    _init_distributed()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    rank = torch.distributed.get_rank()
    cfg = get_config(model, depth=depth)
    ocfg = OptimConfig(learning_rate=1e-4, warmup_steps=0, weight_decay=0.01, ema_decay=0.99, clip_norm=1.0)
    objective = ObjectiveConfig(i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.25)
    kwargs = dict(
        compute_dtype="bfloat16",
        use_megatron_optimizer=True,
        recompute="full",
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        ddp_bucket_size=bucket_size,
    )
    out: dict = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "world": torch.distributed.get_world_size(),
        "model": f"{model}, {depth} layers",
    }
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    tr = Trainer(cfg, ocfg, objective, seed=11, **kwargs)
    dp = tr.dp_size
    out["parameters"] = sum(p.numel() for p in tr.module.parameters())
    out["buckets"] = len(tr.model.bucket_groups)
    _check({p.dtype for p in tr.module.parameters()} == {torch.bfloat16}, "parameters are not all bf16")
    _check({m.dtype for m, _, _ in tr.optimizer.main_shards().values()} == {torch.float32}, "main weights are not fp32")
    _check(out["buckets"] > 1, f"expected several DDP buckets, got {out['buckets']}")

    shape = (dp * per_rank_batch, cfg.in_channels, *LATENT)
    whole, part = tr.draws(shape), tr.draws(shape, rows=slice(1, 2))
    _check(whole.eps.device == tr.device, "draws are not on the training device")
    _check(
        all(torch.equal(getattr(part, f), getattr(whole, f)[1:2]) for f in ("u", "eps", "n_cond", "drop")),
        "a row drawn alone differs from the same row of the whole draw",
    )

    losses, times = [], []
    for step in range(2):
        sync()
        t0 = time.perf_counter()
        m = tr.train_step(_batch(cfg, dp, per_rank_batch, step))
        sync()
        times.append(time.perf_counter() - t0)
        _check(m["finite"] and math.isfinite(m["loss"]), f"step {step}: non-finite loss/grad norm {m}")
        losses.append(m["loss"])
    out["losses"], out["step_seconds"] = losses, times
    tr.sync_params()
    mismatched = sum(
        int(not torch.equal(p.detach().view(-1)[s:e], main.to(torch.bfloat16)))
        for p, (main, s, e) in tr.optimizer.main_shards().items()
    )
    _check(mismatched == 0, f"{mismatched} bf16 parameters are not their main weights rounded")
    at_save = _state_digests(tr)

    ckdir = os.path.join(workdir, "checkpoints")
    if rank == 0 and os.path.isdir(ckdir):
        shutil.rmtree(ckdir)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    checkpointing.save(ckdir, tr, {"position": 2}, async_save=True)
    out["async_save_blocking_seconds"] = time.perf_counter() - t0
    _check(checkpointing.steps(ckdir) == [], "an async save was published before its finalize")
    third = _batch(cfg, dp, per_rank_batch, 2)
    m3 = tr.train_step(third)
    t0 = time.perf_counter()
    _check(checkpointing.finalize_async(blocking=True) == 1, "the async save was not finalized")
    out["finalize_wait_seconds"] = time.perf_counter() - t0
    _check(checkpointing.steps(ckdir) == [2], f"published steps {checkpointing.steps(ckdir)}")

    fresh = Trainer(cfg, ocfg, objective, seed=12, **kwargs)
    meta = checkpointing.restore_latest(ckdir, fresh)
    _check(meta is not None and fresh.step == 2 and fresh.optimizer.count == 2, "restore did not give step 2")
    fresh.sync_params()
    restored = _state_digests(fresh)
    for key, digest in at_save.items():
        _check(restored[key] == digest, f"restored {key} differs from the state at the save")
    r3 = fresh.train_step(third)
    out["step3_loss"], out["step3_loss_restored"] = m3["loss"], r3["loss"]
    # cuDNN/TE backward is not bit-deterministic; the same step from the same state agrees to bf16.
    _check(
        abs(r3["loss"] - m3["loss"]) <= 1e-3 * abs(m3["loss"]),
        f"third step after restore: loss {r3['loss']} vs {m3['loss']}",
    )
    if on_gpu:
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0:
        print(json.dumps(out, indent=1))
        if not keep_files:
            shutil.rmtree(ckdir, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--per_rank_batch", type=int, default=2)
    parser.add_argument("--keep_files", action="store_true")
    args = parser.parse_args()
    run(args.workdir, per_rank_batch=args.per_rank_batch, keep_files=args.keep_files)
    from mugv_megatron.parallel import state as parallel

    parallel.teardown()


if __name__ == "__main__":
    main()
