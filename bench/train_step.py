"""Benchmark the JAX train step: step time, tokens/s, analytic FLOPs, TFLOP/s per device, MFU.

    python bench/train_step.py --model=tiny --mesh=1,1,1,1 --bucket=4,16,16,8 --steps=10
    python bench/train_step.py --model=10b --mesh=-1,8,1,1 --bucket=14,160,90,8 --dtype=bfloat16 --remat=full
    python bench/train_step.py --model=1b --depth=2 --bucket=4,16,16,2 --text_len=64 --lora

`--lora` times the full step and then a LoRA step at the same shapes (rank --lora_rank, alpha
--lora_alpha, the base frozen in --lora_base_dtype) and prints the ratio LoRA / full beside the
ratio of their model FLOPs (mugv/flops.py: a LoRA step computes no weight gradients of the base).

Prints the machine, the geometry, and per-step numbers (median of --steps after --warmup steps).
MFU uses mugv.flops (the definition both trainers share); it is "n/a" on devices without a known
peak (CPU). Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from mugv.lora import LoraConfig
from mugv.training import ObjectiveConfig, OptimConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--depth", type=int, default=0, help="override depth (0 = preset)")
    ap.add_argument("--mesh", default="-1,1,1,1", help="data,fsdp,tensor,context")
    ap.add_argument("--bucket", default="4,16,16,8", help="latent frames,height,width,global batch")
    ap.add_argument("--text_len", type=int, default=0, help="caption tokens (0 = the model's max)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default="none")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--host_devices", type=int, default=0, help="fake CPU devices (0 = real devices)")
    ap.add_argument("--lora", action="store_true", help="also time a LoRA step and print LoRA / full")
    ap.add_argument("--lora_rank", type=int, default=64)
    ap.add_argument("--lora_alpha", type=float, default=32.0)
    ap.add_argument("--lora_base_dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.host_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.host_devices}"

    import jax

    from mugv import flops
    from mugv.config import get_config
    from mugv.data.synthetic import Bucket, SyntheticTextToLatent
    from mugv.geometry import num_video_tokens
    from mugv_jax.dit.model import RuntimeOptions
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.train import step as tr

    cfg = get_config(args.model, **({"depth": args.depth} if args.depth else {}))
    mesh = mesh_lib.build_mesh(dict(zip(("data", "fsdp", "tensor", "context"), map(int, args.mesh.split(",")))))
    f, h, w, b = map(int, args.bucket.split(","))
    args.text_len = args.text_len or cfg.max_text_tokens
    bucket = Bucket(f, h, w, b)
    source = SyntheticTextToLatent([bucket], in_channels=cfg.in_channels, text_dim=cfg.text_dim, text_len=args.text_len)

    def timed(lora: LoraConfig):
        """(first step seconds, median step seconds, last metrics) of a fresh trainer's steps."""
        trainer = tr.Trainer(
            cfg,
            RuntimeOptions(compute_dtype=args.dtype, remat=args.remat, lora_scale=lora.scale if lora.on else 0.0),
            OptimConfig(warmup_steps=0),
            ObjectiveConfig(),
            mesh,
            lora=lora,
        )
        state = trainer.init_state(0)
        times = []
        for i in range(args.warmup + args.steps):
            batch = source.batch(i)
            batch.pop("prompt_id")
            batch = trainer.put_batch(batch)
            t0 = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        return times[0], statistics.median(times[args.warmup :]), metrics

    t_compile, step, metrics = timed(LoraConfig())
    n_tok = num_video_tokens(bucket.latent_shape, cfg)
    sf = flops.step_flops(cfg, b, n_tok, args.text_len)
    dev = jax.devices()[0]
    peak = flops.peak_flops_for(dev.device_kind)
    mfu = flops.mfu(sf.train, step, mesh.size, peak)
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; jax {jax.__version__} on {mesh.size}× {dev.platform}:{dev.device_kind}"
    )
    print(
        f"model {args.model} (depth {cfg.depth}, hidden {cfg.hidden_size}), {mesh_lib.describe(mesh)}, "
        f"{args.dtype}, remat {args.remat}"
    )
    print(f"bucket latent {bucket.latent_shape} × batch {b}: {n_tok} video tokens + 2, {args.text_len} text tokens")
    print(f"first step (compile + run): {t_compile:.2f} s")
    print(f"step time: {step * 1e3:.1f} ms (median of {args.steps})")
    print(f"samples/s: {b / step:.2f}   tokens/s: {b * n_tok / step:,.0f}")
    print(f"analytic FLOPs/step: {sf.train:.4g} (forward {sf.forward:.4g})")
    print(
        f"TFLOP/s per device: {sf.train / step / mesh.size / 1e12:.4f}   "
        f"MFU: {'n/a (no peak known for ' + dev.device_kind + ')' if mfu is None else f'{mfu:.2%}'}"
    )
    print(f"final loss {float(metrics['loss']):.4f}")
    if args.lora:
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, base_dtype=args.lora_base_dtype)
        l_compile, l_step, l_metrics = timed(lora)
        lf = flops.lora_step_flops(cfg, b, n_tok, args.text_len, lora)
        print(
            f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, base {lora.base_dtype}: first step {l_compile:.2f} s, "
            f"step time {l_step * 1e3:.1f} ms (median of {args.steps}), final loss {float(l_metrics['loss']):.4f}"
        )
        print(
            f"LoRA / full step time: {l_step / step:.3f}   (model FLOPs LoRA / full: {lf.train / sf.train:.3f}; "
            f"LoRA {lf.train:.4g} FLOPs/step)"
        )


if __name__ == "__main__":
    main()
