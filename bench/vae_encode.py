"""Peak memory and throughput of VAE encode/decode of a 720p clip (random-init weights).

    .venv/bin/python bench/vae_encode.py --preset release --frames 8 --height 720 --width 1280

Runs `JittedVAE` (optionally `Tiled`) chunk by chunk and times every network call. The first
call of each network shape includes its XLA compile and is reported separately; steady-state
frames/s come from the other calls. Peak memory is the process's max RSS (ru_maxrss). Prints
one Markdown table row per phase (see docs/benchmarks.md, "VAE encode/decode").
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

import mugv_jax.vae as vae
from mugv_jax.vae.checkpoint import random_vae
from mugv_jax.vae.jitted import JittedVAE
from mugv_jax.vae.tiling import Tiled, Tiling


class TimedVAE(JittedVAE):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = defaultdict(list)  # (network, shape) → seconds per call

    def _run(self, network, inputs):
        outs = []
        for x in inputs:
            t = time.perf_counter()
            (y,) = super()._run(network, [x])
            y.block_until_ready()
            self.calls[network, tuple(x.shape)].append(time.perf_counter() - t)
            outs.append(y)
        return outs


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="release")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--tile", type=int, default=0, help="latents; 0 = untiled")
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--no-decode", action="store_true")
    args = p.parse_args()

    cfg = vae.get_vae_config(args.preset, micro_batch_size=args.micro_batch_size)
    t0 = time.perf_counter()
    model = random_vae(cfg, seed=0)  # numpy init: no XLA compile
    print(f"# init {time.perf_counter() - t0:.1f}s, rss {peak_rss_gib():.2f} GiB, devices {jax.devices()}")
    timed = TimedVAE(model)
    pipe = Tiled(timed, Tiling(args.tile, args.overlap)) if args.tile else timed
    x = jax.random.uniform(jax.random.key(0), (1, 3, args.frames, args.height, args.width), jnp.float32, -1, 1)
    rows = []

    def phase(name, fn):
        before = {k: len(v) for k, v in timed.calls.items()}
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        wall = time.perf_counter() - t
        first = sum(v[0] for k, v in timed.calls.items() if before.get(k, 0) == 0)
        steady = sum(sum(v[max(before.get(k, 0), 1) :]) for k, v in timed.calls.items())
        n_steady_frames = args.frames - args.micro_batch_size  # the first 2D chunk compiled
        rows.append((name, wall, first, steady, n_steady_frames, peak_rss_gib()))
        print(
            f"# {name}: wall {wall:.1f}s, first calls {first:.1f}s, steady {steady:.1f}s, "
            f"peak RSS {peak_rss_gib():.2f} GiB",
            flush=True,
        )
        return out

    z = phase("encode", lambda: pipe.encode(x))
    if not args.no_decode:
        phase("decode", lambda: pipe.decode(z, args.frames))
    print(
        f"# {platform.node()}, {jax.device_count()} {jax.devices()[0].platform} device(s), preset "
        f"{args.preset}, {args.frames}×{args.height}×{args.width}, micro_batch_size "
        f"{args.micro_batch_size}, tile {args.tile or 'off'}"
    )
    print("| phase | wall s | first calls (incl. compile) s | steady s | steady frames/s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name, wall, first, steady, n, rss in rows:
        fps = n / steady if steady > 0 and n > 0 else float("nan")
        print(f"| {name} | {wall:.1f} | {first:.1f} | {steady:.1f} | {fps:.3f} | {rss:.2f} |")
    for (net, shape), v in sorted(timed.calls.items()):
        print(
            f"#   {net} {shape}: {len(v)} calls, first {v[0]:.2f}s, rest mean "
            f"{np.mean(v[1:]) if len(v) > 1 else float('nan'):.2f}s"
        )


if __name__ == "__main__":
    main()
