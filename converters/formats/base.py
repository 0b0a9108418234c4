"""What every checkpoint format shares: the reader/writer contract, dtypes, atomic outputs, staging.

A reader exposes the checkpoint in canonical release names (converters/schema.py) whatever its
on-disk layout: `entries()` gives every tensor's shape and dtype without reading data, `items()`
yields (name, array) one tensor at a time in the order cheapest for that format, `get(name)` reads
one tensor. A writer is told every entry (name, shape, dtype) up front, then accepts the tensors in
any order, one at a time, so a conversion holds about one tensor (at most one layer) in memory.

Arrays in flight are numpy arrays; bfloat16 is `ml_dtypes.bfloat16` (what JAX and tensorstore
use), converted to and from torch by reinterpreting the 16-bit pattern, never by value.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator

import ml_dtypes
import numpy as np

from mugv.config import DiTConfig

Shape = tuple[int, ...]
BF16 = np.dtype(ml_dtypes.bfloat16)

# Names used on the command line and in `inspect`.
DTYPE_NAMES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16),
               "float64": np.dtype(np.float64)}


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

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

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
    """Writes one checkpoint into `self.tmp` (a temporary name); `commit` makes it appear."""

    format = "?"

    def __init__(self, path: str, config: DiTConfig, entries: dict[str, Entry]):
        self.path = path
        self.config = config
        self.entries = dict(entries)
        self._written: set[str] = set()

    def write(self, name: str, array: np.ndarray) -> None:
        want = self.entries.get(name)
        if want is None:
            raise KeyError(f"{self.path}: tensor {name!r} was not announced to the writer")
        if tuple(array.shape) != want.shape or array.dtype != want.dtype:
            raise ValueError(f"{self.path}: tensor {name} has shape {list(array.shape)} "
                             f"{dtype_name(array.dtype)}, expected {list(want.shape)} "
                             f"{dtype_name(want.dtype)}")
        if name in self._written:
            raise ValueError(f"{self.path}: tensor {name} written twice")
        self._write(name, np.ascontiguousarray(array))
        self._written.add(name)

    def _write(self, name: str, array: np.ndarray) -> None:
        raise NotImplementedError

    def check_complete(self) -> None:
        missing = [n for n in self.entries if n not in self._written]
        if missing:
            raise RuntimeError(f"{self.path}: conversion incomplete, {len(missing)} tensors never "
                               f"written (first: {missing[:5]})")

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


def cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """`array` in `dtype` (None = keep). float32 → bfloat16 rounds to nearest even, like torch."""
    if dtype is None or array.dtype == dtype:
        return array
    return array.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Outputs appear complete or not at all


def partial_name(path: str) -> str:
    """The temporary name of an output being written: hidden, in the same directory (so the
    final rename is atomic), and marked partial so an interrupted run leaves nothing that
    looks like a checkpoint."""
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def check_output_free(path: str, force: bool) -> None:
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"output {path} already exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory {parent} does not exist (for {path})")


@contextlib.contextmanager
def atomic_output(path: str, force: bool = False):
    """Yield a temporary path next to `path`; on success rename it to `path`.

    An existing `path` is refused unless `force`, and then replaced only after the new output is
    complete. On any failure the temporary output is removed.
    """
    path = os.path.abspath(path)
    check_output_free(path, force)
    tmp = partial_name(path)
    try:
        yield tmp
        if os.path.lexists(path):
            old = partial_name(path) + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            remove_path(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Staging: tensors parked on disk (not in memory) until a format that needs them all at once
# (torch_dist, orbax) can take them


def pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


class RawStore:
    """Raw little-endian arrays in files under `directory`, written and read by layer with plain
    file I/O. No mmap: pages parked here are page cache, not this process's memory."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._arrays: dict[str, tuple[str, Entry]] = {}

    def file(self, key: str) -> str:
        return self._arrays[key][0]

    def create(self, key: str, shape: Shape, dtype) -> str:
        path = os.path.join(self.directory, f"{len(self._arrays):05d}.bin")
        entry = Entry(shape, dtype)
        with open(path, "wb") as f:
            f.truncate(entry.nbytes)
        self._arrays[key] = (path, entry)
        return path

    def entry(self, key: str) -> Entry:
        return self._arrays[key][1]

    def _row(self, key: str, index: int | None) -> tuple[str, Entry, int, Shape]:
        path, entry = self._arrays[key]
        if index is None:
            return path, entry, 0, entry.shape
        row_shape = entry.shape[1:]
        return path, entry, index * int(np.prod(row_shape, dtype=np.int64)) * entry.dtype.itemsize, row_shape

    def write(self, key: str, array: np.ndarray, index: int | None = None) -> None:
        """The whole array, or row `index` along the first axis (one layer)."""
        path, entry, offset, shape = self._row(key, index)
        if tuple(array.shape) != shape or array.dtype != entry.dtype:
            raise ValueError(f"staging {key}: got {list(array.shape)} {array.dtype}, "
                             f"expected {list(shape)} {entry.dtype}")
        fd = os.open(path, os.O_WRONLY)
        try:
            pwrite_all(fd, array, offset)
        finally:
            os.close(fd)

    def write_region(self, key: str, region: tuple[slice, ...], array: np.ndarray) -> None:
        """A rectangular block (a storage chunk of another format), as contiguous runs."""
        path, entry = self._arrays[key]
        shape, itemsize = entry.shape, entry.dtype.itemsize
        starts = [s.start for s in region]
        # Dims after `k` are covered whole, so each index over dims < k is one contiguous run.
        k = len(shape) - 1
        while k > 0 and array.shape[k] == shape[k]:
            k -= 1
        strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
        fd = os.open(path, os.O_WRONLY)
        try:
            for idx in np.ndindex(*array.shape[:k]):
                elem = sum((starts[i] + idx[i]) * strides[i] for i in range(k)) + starts[k] * strides[k]
                pwrite_all(fd, array[idx], elem * itemsize)
        finally:
            os.close(fd)

    def read(self, key: str, index: int | None = None) -> np.ndarray:
        path, entry, offset, shape = self._row(key, index)
        count = int(np.prod(shape, dtype=np.int64))
        return np.fromfile(path, dtype=entry.dtype, count=count, offset=offset).reshape(shape)

    def remove(self, key: str) -> None:
        path, _ = self._arrays.pop(key)
        os.unlink(path)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
