"""Small, safe file helpers: atomic safetensors writes and checked reads."""

from __future__ import annotations

import os

import numpy as np

from mugv.io.atomic import atomic_output


def save_atomic(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write to a temporary file in the target directory, then rename: a crash never leaves a
    half-written file under the final name, and an existing file stays intact until the end."""
    from safetensors.numpy import save_file

    with atomic_output(os.fspath(path), force=True, make_parent=True) as tmp:
        # asarray(order="C"), not ascontiguousarray: the latter turns 0-d tensors (the VAE's
        # scalar `logvar`) into shape (1,), which a strict load then rejects.
        save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, tmp, metadata=metadata)


def load_tensors(path: str | os.PathLike, required: tuple[str, ...] = (), what: str = "file"):
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    tensors = load_file(path)
    missing = [k for k in required if k not in tensors]
    if missing:
        raise KeyError(f"{what} {path} lacks tensor(s) {missing}; it has {sorted(tensors)}")
    return tensors
