"""Prompt features files: what `python -m mugv_data text` writes and `python -m mugv_jax.sample
--text` reads.

A safetensors file with `y` [1, 1, L, D] float32 (the prompt's text-encoder features, zero past
the mask) and `mask` [1, L] int32 (1 = valid token), and optionally the negative prompt's
`neg_y`/`neg_mask` of the same shapes. Metadata (strings): `text_encoder`, `prompt`, `negative`.
"""

from __future__ import annotations

import numpy as np

from mugv.safetensors_io import load_tensors, save_atomic

REQUIRED = ("y", "mask")
NEGATIVE = ("neg_y", "neg_mask")


def write(
    path: str,
    y: np.ndarray,
    mask: np.ndarray,
    *,
    neg_y: np.ndarray | None = None,
    neg_mask: np.ndarray | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write one prompt's features [L, D] / mask [L] (and a negative prompt's) as the sampler
    takes them, under a temporary name renamed when complete; returns `path`."""
    tensors = {"y": np.asarray(y, np.float32)[None, None], "mask": np.asarray(mask, np.int32)[None]}
    if (neg_y is None) != (neg_mask is None):
        raise ValueError("a negative prompt needs both its features and its mask")
    if neg_y is not None:
        tensors.update(neg_y=np.asarray(neg_y, np.float32)[None, None], neg_mask=np.asarray(neg_mask, np.int32)[None])
    for k, v in tensors.items():
        want = 4 if "y" in k else 2
        if v.ndim != want:
            raise ValueError(f"{path}: {k} must be {'[L, D]' if want == 4 else '[L]'}, got {list(v.shape[want - 2 :])}")
    save_atomic(tensors, path, metadata=metadata)
    return path


def read(path: str, what: str = "--text features") -> dict[str, np.ndarray]:
    """The tensors of a prompt features file; `y` and `mask` must be there (errors name `what`)."""
    return load_tensors(path, REQUIRED, what=what)
