"""What checksums cost: CRC-32 (mugv.io.digest) per GB against writing that GB.

    python bench/digest_cost.py --gb 1

Writes `--gb` GB of random bytes in 4 files (written and fsynced, like a checkpoint save), then
computes their digest table on 1 and on 4 threads, and checks it. Prints seconds and GB/s of
each and the ratio to the write. The files are read back from the page cache (a fresh read of a
checkpoint from disk adds the disk's read time, which the save paid too).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    import numpy as np

    from mugv.io import digest

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--dir", default=None, help="where to write (default: $TMPDIR)")
    args = p.parse_args()
    total = int(args.gb * 1e9)
    files, per = 4, total // 4
    block = np.random.default_rng(0).integers(0, 256, size=min(per, 64 * 2**20), dtype=np.uint8).tobytes()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        t0 = time.perf_counter()
        for i in range(files):
            with open(os.path.join(d, f"f{i}"), "wb") as f:
                left = per
                while left > 0:
                    n = f.write(block[: min(left, len(block))])
                    left -= n
                f.flush()
                os.fsync(f.fileno())
        write = time.perf_counter() - t0
        names = [f"f{i}" for i in range(files)]
        times = {}
        for workers in (1, 4):
            t0 = time.perf_counter()
            table = digest.compute(d, names, workers=workers)
            times[workers] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert digest.check(d, table, workers=4).ok
        check = time.perf_counter() - t0
    gb = files * per / 1e9
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"write + fsync {gb:.2f} GB: {write:.2f} s ({gb / write:.2f} GB/s)")
    for workers, t in times.items():
        print(
            f"digest table, {workers} thread(s): {t:.2f} s ({gb / t:.2f} GB/s, {t / gb:.2f} s per GB), "
            f"{t / write:.0%} of the write"
        )
    print(
        f"check against the table, 4 threads: {check:.2f} s ({gb / check:.2f} GB/s), {check / write:.0%} of the write"
    )


if __name__ == "__main__":
    main()
