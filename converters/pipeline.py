"""Tensors from a reader to a writer on a pool of threads, with a cap on the bytes in flight.

The calling thread walks the reader's jobs (`Reader.jobs`: a name and a `read()` that may run on
any thread) in the reader's order; each job is then read, cast and handed to the writer on a
worker thread. The work that dominates a conversion releases the GIL (page faults on memory-mapped
sources, numpy copies and transposes, positioned writes, tensorstore), so the threads overlap
reading, transforming and writing. At most `max_bytes` of tensors (counted at their output size)
are between read and written at once, except that one tensor larger than that still goes alone,
which bounds the memory the copies take.

On the first error no further job is started, the jobs already running finish, and the error is
raised in the calling thread (the caller removes the partial output).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DEFAULT_MAX_BYTES = 512 * 2**20


@contextlib.contextmanager
def lean_runtime():
    """Runtime settings for a conversion, restored after.

    * The objects that exist now (modules, the checkpoint's metadata) are frozen out of the
      garbage collector: a conversion allocates many small objects (DCP plans, futures), and
      each collection would otherwise walk the whole heap again (a quarter of the CPU time of a
      torch_dist read, measured).
    * torch runs single-threaded: the pipeline has its own threads, and idle intra-op threads
      spin on their barriers.
    """
    gc.freeze()
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch:
            torch.set_num_threads(threads)
        gc.unfreeze()


def default_workers() -> int:
    # Threads spend much of their time waiting on the disk, so more threads than cores pay off.
    return max(4, min(16, 2 * (os.cpu_count() or 1)))


class _Budget:
    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit and not stop.is_set():
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def copy_tensors(
    jobs: Iterable[tuple[str, Callable[[], np.ndarray]]],
    write: Callable[[str, np.ndarray], None],
    sizes: dict[str, int],
    *,
    workers: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    done: Callable[[str], None] | None = None,
) -> None:
    """`write(name, read())` for every job; `workers=1` runs them one by one in this thread."""
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        for name, read in jobs:
            write(name, read())
            if done:
                done(name)
        return

    budget = _Budget(max_bytes)
    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def task(name: str, read, nbytes: int) -> None:
        try:
            if not stop.is_set():
                write(name, read())
                if done:
                    done(name)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread below
            with lock:
                errors.append(e)
            stop.set()
            budget.wake()
        finally:
            budget.release(nbytes)

    with ThreadPoolExecutor(workers, thread_name_prefix="mugv-convert") as pool:
        try:
            for name, read in jobs:
                nbytes = sizes[name]
                budget.acquire(nbytes, stop)
                if stop.is_set():
                    budget.release(nbytes)
                    break
                pool.submit(task, name, read, nbytes)
        except BaseException:
            stop.set()
            raise
        # Leaving the block waits for the submitted tasks; each checks `stop` before it starts.
    if errors:
        raise errors[0]
