"""Staging: tensors parked until a format that needs them all at once (the torch_dist and orbax
writers) can take them, or a stored array re-chunked by layer (the JAX reader): on disk (not in
memory), or, for a view of a memory-mapped source, as that view (no bytes copied; the source file
is the staging)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable

import numpy as np

from mugv.io.base import Entry, Shape, pwrite_all


class RawStore:
    """Raw little-endian arrays in files under `directory`, written and read by layer with plain
    file I/O. No mmap: pages parked here are page cache, not this process's memory."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._arrays: dict[str, tuple[str | None, Entry]] = {}
        # (key, row or None) → (view of a mapped source, transform applied when read)
        self._kept: dict[tuple[str, int | None], tuple[np.ndarray, Callable | None]] = {}
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        """Every array parked here, in the order it was created or kept."""
        return list(self._arrays)

    def file(self, key: str) -> str | None:
        """The staging file of `key`; None when it is kept as a view."""
        return self._arrays[key][0]

    def create(self, key: str, shape: Shape, dtype) -> str:
        entry = Entry(shape, dtype)
        with self._lock:  # writers call this from a pool of threads
            path = os.path.join(self.directory, f"{len(self._arrays):05d}.bin")
            self._arrays[key] = (path, entry)
        with open(path, "wb") as f:
            f.truncate(entry.nbytes)
        return path

    def keep(
        self,
        key: str,
        view: np.ndarray,
        index: int | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Park `view` (of a memory-mapped source that stays unchanged until the store is read)
        instead of its bytes; `read` returns `transform(view)`. A whole array (`index` None) that
        was not created is registered with the view's shape and dtype."""
        with self._lock:
            if index is None and key not in self._arrays:
                self._arrays[key] = (None, Entry(view.shape, view.dtype))
            self._kept[(key, index)] = (view, transform)

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
            raise ValueError(
                f"staging {key}: got {list(array.shape)} {array.dtype}, expected {list(shape)} {entry.dtype}"
            )
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
        strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
        fd = os.open(path, os.O_WRONLY)
        try:
            for idx in np.ndindex(*array.shape[:k]):
                elem = sum((starts[i] + idx[i]) * strides[i] for i in range(k)) + starts[k] * strides[k]
                pwrite_all(fd, array[idx], elem * itemsize)
        finally:
            os.close(fd)

    def read(self, key: str, index: int | None = None) -> np.ndarray:
        path, entry, offset, shape = self._row(key, index)
        kept = self._kept.get((key, index))
        if kept is not None:
            view, transform = kept
            array = transform(view) if transform else view
            if tuple(array.shape) != shape or array.dtype != entry.dtype:
                raise ValueError(
                    f"staging {key}: kept view gives {list(array.shape)} {array.dtype}, "
                    f"expected {list(shape)} {entry.dtype}"
                )
            return array
        count = int(np.prod(shape, dtype=np.int64))
        return np.fromfile(path, dtype=entry.dtype, count=count, offset=offset).reshape(shape)

    def close(self) -> None:
        self._kept.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
