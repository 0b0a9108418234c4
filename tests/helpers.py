"""Shared test utilities: golden files (copied into tests/golden), tolerances."""

from __future__ import annotations

import os
from functools import cache

import numpy as np

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
DIT_WEIGHTS = os.path.join(GOLDEN, "dit_tiny", "weights.safetensors")
DIT_VECTORS = os.path.join(GOLDEN, "dit_tiny", "vectors.safetensors")


@cache
def dit_vectors() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(DIT_VECTORS)


@cache
def dit_weights() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(DIT_WEIGHTS)


def case_inputs(case: str) -> tuple[tuple, dict]:
    """Positional and keyword inputs of a golden DiT case, in the release call layout."""
    v = dit_vectors()
    g = lambda k: v[f"{case}.in.{k}"]
    return (g("x"), g("timestep"), g("y")), dict(
        mask=g("mask"), x_mask=g("x_mask"), fps=g("fps"), frame_indice=g("frame_indice")
    )


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def snapshot(root) -> dict:
    """{file: bytes} of everything under `root` (small test workdirs): what a run changed."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out
