"""Staging: tensors parked on disk (not in memory) until a format that needs them all at once
(torch_dist, orbax) can take them."""
from __future__ import annotations

import os
import shutil

import numpy as np

from mugv.io.base import Entry, Shape, pwrite_all


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
