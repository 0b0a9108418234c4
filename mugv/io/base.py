"""What every checkpoint format shares: the reader/writer contract, dtypes, memory-mapped reads and
positioned writes (atomic outputs: `mugv.io.atomic`).

A reader exposes the checkpoint in canonical release names (mugv/schema.py) whatever its
on-disk layout: `entries()` gives every tensor's shape and dtype without reading data, `items()`
yields (name, array) one tensor at a time in the order cheapest for that format, `get(name)` reads
one tensor. A writer is told every entry (name, shape, dtype) up front, then accepts the tensors in
any order, one at a time, so a conversion holds about one tensor (at most one layer) in memory.

Arrays in flight are numpy arrays; bfloat16 is `ml_dtypes.bfloat16` (what JAX and tensorstore
use), converted to and from torch by reinterpreting the 16-bit pattern, never by value.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np

from mugv.config import DiTConfig

Shape = tuple[int, ...]
BF16 = np.dtype(ml_dtypes.bfloat16)

# Names used on the command line and in `inspect`.
DTYPE_NAMES = {
    "float32": np.dtype(np.float32),
    "bfloat16": BF16,
    "float16": np.dtype(np.float16),
    "float64": np.dtype(np.float64),
}


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    for name, d in DTYPE_NAMES.items():
        if d == dtype:
            return name
    return dtype.name


class Entry(tuple):
    """(shape, dtype) of one tensor."""

    __slots__ = ()

    def __new__(cls, shape, dtype):
        return super().__new__(cls, (tuple(int(s) for s in shape), np.dtype(dtype)))

    @property
    def shape(self) -> Shape:
        return self[0]

    @property
    def dtype(self) -> np.dtype:
        return self[1]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class Reader:
    """Read-only view of a checkpoint in release names. Subclasses set `format`, `path`."""

    format = "?"
    path = ""
    # The model description stored in the checkpoint, if the format keeps one.
    stored_config: DiTConfig | None = None

    def entries(self) -> dict[str, Entry]:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.entries():
            yield name, self.get(name)

    def jobs(self) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        """(name, read) for every tensor, in the order cheapest for the format. `read()` returns
        the tensor and may run on any thread, several at once (converters/pipeline.py). Formats
        that can overlap reads override this; by default `items()` reads here, one at a time."""
        for name, array in self.items():
            yield name, (lambda a=array: a)

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor at once (the whole model in memory, as a model needs), by the format's
        fastest whole read; `items()` bounds memory instead."""
        return dict(self.items())

    def null_text(self) -> tuple[np.ndarray, str] | None:
        """(the trained null caption [max_text_tokens, D] float32, where in the checkpoint it
        is), or None when the checkpoint holds none (only training checkpoints do)."""
        return None

    def integrity(self):
        """Every byte against the checksums recorded at write (a `mugv.io.digest.Check`), or None
        when the checkpoint records none (written before checksums, or by another tool)."""
        return None

    @property
    def location(self) -> str:
        """What errors name: the file, or the step / iteration directory read."""
        return self.path

    def describe(self) -> dict:
        """Format-specific facts for `inspect` (step, iteration, TP/PP, files)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Writer:
    """Writes one checkpoint into a temporary name (renamed into place by the caller).

    A writer may keep a view of a memory-mapped source tensor (`file_backed`) instead of copying
    it, until `finish`; the source must stay unchanged until then (a conversion's reader does).
    """

    format = "?"

    def __init__(self, path: str, config: DiTConfig, entries: dict[str, Entry]):
        self.path = path
        self.config = config
        self.entries = dict(entries)
        self._written: set[str] = set()
        self._lock = threading.Lock()

    def write(self, name: str, array: np.ndarray) -> None:
        """Write one tensor. Thread-safe for distinct names: a conversion writes from a pool."""
        want = self.entries.get(name)
        if want is None:
            raise KeyError(f"{self.path}: tensor {name!r} was not announced to the writer")
        if tuple(array.shape) != want.shape or array.dtype != want.dtype:
            raise ValueError(
                f"{self.path}: tensor {name} has shape {list(array.shape)} "
                f"{dtype_name(array.dtype)}, expected {list(want.shape)} "
                f"{dtype_name(want.dtype)}"
            )
        with self._lock:
            if name in self._written:
                raise ValueError(f"{self.path}: tensor {name} written twice")
            self._written.add(name)
        # asarray(order="C"), not ascontiguousarray: that makes a 0-d tensor (the VAE's `logvar`) 1-d.
        self._write(name, np.asarray(array, order="C"))

    def _write(self, name: str, array: np.ndarray) -> None:
        raise NotImplementedError

    def check_complete(self) -> None:
        missing = [n for n in self.entries if n not in self._written]
        if missing:
            raise RuntimeError(
                f"{self.path}: conversion incomplete, {len(missing)} tensors never written (first: {missing[:5]})"
            )

    def finish(self) -> None:
        """Flush everything into the temporary output (called once all tensors are written)."""

    def abort(self) -> None:
        """Release resources after a failure (the temporary output is removed by the caller)."""


# ---------------------------------------------------------------------------------------------
# numpy <-> torch without value conversion


def to_torch(array: np.ndarray):
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def from_torch(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BF16)
    return tensor.numpy()


def numpy_dtype_of_torch(torch_dtype) -> np.dtype:
    import torch

    if torch_dtype == torch.bfloat16:
        return BF16
    return np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)


def torch_dtype_of(dtype):
    import torch

    dtype = np.dtype(dtype)
    if dtype == BF16:
        return torch.bfloat16
    return torch.from_numpy(np.zeros((), dtype)).dtype


def is_floating(dtype) -> bool:
    """float16/32/64 or bfloat16 (which numpy does not count as floating)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == BF16


def cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """`array` in `dtype` (None = keep). float32 → bfloat16 rounds to nearest even, like torch."""
    if dtype is None or array.dtype == dtype:
        return array
    return array.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Positioned writes


def pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


# ---------------------------------------------------------------------------------------------
# Memory-mapped reads


def map_file(path: str) -> mmap.mmap:
    """`path` mapped copy-on-write: tensors are numpy views of it, read from disk when touched
    (page cache, not this process's memory), and a consumer that writes into one gets private
    pages rather than a changed checkpoint."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


_PAGE = mmap.PAGESIZE


def file_backed(array: np.ndarray) -> bool:
    """Whether `array` is a view of a memory-mapped file (what the release reader hands out)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


def mapped_array(mapping: mmap.mmap, dtype, shape: Shape, offset: int, prefetch: bool = True) -> np.ndarray:
    """The array of `shape` stored C-contiguously at byte `offset` of `mapping`, without a copy.

    `prefetch` asks the kernel to start reading the whole range now (MADV_WILLNEED), so the page
    faults of whoever reads the tensor hit the page cache instead of waiting for 128 KiB readahead.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    if prefetch and hasattr(mapping, "madvise"):
        start = offset - offset % _PAGE
        mapping.madvise(mmap.MADV_WILLNEED, start, offset + count * dtype.itemsize - start)
    return np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)
