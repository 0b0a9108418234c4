"""Benchmark the mugv_data loader: examples/s and MB/s of decoded float32 batches.

    python bench/data_loader.py --data=/tmp/d/mugv_clips/1.0.0 --batch-size=8 --text-len=32 --workers=0
    python bench/data_loader.py --synthetic=256 --latent=3,16,16 --workers=2 --latent-dtype=float32

`--synthetic=N` first writes N random examples (one bucket) to a temporary directory, with bf16
latents (the default storage) or float32 ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _synthetic(n: int, latent: tuple[int, int, int], text_dim: int, text_len: int, latent_dtype: str) -> str:
    import numpy as np

    from mugv.data import shards

    rng = np.random.default_rng(0)

    def examples():
        for i in range(n):
            k = int(rng.integers(1, text_len + 1))
            yield {
                "sample_id": f"s{i:07d}",
                "source_id": "bench",
                "caption": "",
                "bucket_id": 0,
                "latents": rng.standard_normal((24, *latent)).astype(np.float32),
                "text": rng.standard_normal((k, text_dim)).astype(np.float32),
                "text_len": k,
                "fps": 24.0,
                "num_frames": 8 * latent[0],
                "height": 8 * latent[1],
                "width": 8 * latent[2],
            }

    return shards.write_shards(
        examples,
        tempfile.mkdtemp(prefix="mugv-bench-"),
        buckets=[latent],
        latent_channels=24,
        text_dim=text_dim,
        latent_dtype=latent_dtype,
    )


def main() -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    p = argparse.ArgumentParser()
    p.add_argument("--data")
    p.add_argument("--synthetic", type=int, default=0)
    p.add_argument("--latent", default="3,16,16")
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--latent-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = p.parse_args()
    from mugv.data.loader import ShardLoader

    data = a.data or _synthetic(
        a.synthetic, tuple(int(v) for v in a.latent.split(",")), a.text_dim, a.text_len, a.latent_dtype
    )
    loader = ShardLoader(data, a.batch_size, text_len=a.text_len, num_workers=a.workers)
    for _ in range(a.warmup):
        next(loader)
    t, n, nbytes = time.perf_counter(), 0, 0
    for _ in range(a.steps):
        b = next(loader)
        n += b["latents"].shape[0]
        nbytes += sum(v.nbytes for v in b.values())
    dt = time.perf_counter() - t
    print(
        f"{data}: {a.latent_dtype if not a.data else 'as stored'} workers={a.workers} batch={a.batch_size} "
        f"{a.steps} batches in {dt:.2f}s: "
        f"{n / dt:.1f} examples/s, {nbytes / dt / 2**20:.1f} MB/s, skipped={loader.skipped}"
    )


if __name__ == "__main__":
    main()
