"""The null caption a DiT was trained with, stored next to its exported release weights.

Both trainers replace dropped captions with a fixed random `null_text` [max_text_tokens, D]
(all rows valid) kept in the training state (JAX `state["null_text"]`, Megatron
`trainer.null_text` / `context_embedder.drop_emb`). It is not a release weight, so the exporters
write it beside the weights as a sidecar, and the sampler uses it as the unconditional input of
classifier-free guidance when no negative prompt is given:

    dit_ema.safetensors            the release-layout weights
    dit_ema.null_text.safetensors  {"null_text": float32 [max_text_tokens, D]}, metadata "source"

The sidecar of `W` is W with its weight suffix (.safetensors, .pt, .pth, .bin, .ckpt,
.safetensors.index.json, .index.json) replaced by `.null_text.safetensors`; a shard folder's is
`null_text.safetensors` inside it. Training checkpoints keep theirs inside (`Reader.null_text`);
`python -m converters convert` to release format writes it from there.
"""

from __future__ import annotations

import os

import numpy as np

from mugv.io.atomic import atomic_output
from mugv.io.release import INDEX_SUFFIX, TORCH_SUFFIXES

KEY = "null_text"
SUFFIX = ".null_text.safetensors"
_WEIGHT_SUFFIXES = (".safetensors" + INDEX_SUFFIX, INDEX_SUFFIX, ".safetensors", *TORCH_SUFFIXES)


def sidecar_path(weights: str) -> str:
    """Where the null caption of the release weights at `weights` lives."""
    weights = os.fspath(weights)
    if os.path.isdir(weights):
        return os.path.join(weights, KEY + ".safetensors")
    head, name = os.path.split(weights)
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return os.path.join(head, name + SUFFIX)


def save(path: str, null_text, *, source: str) -> str:
    """Write the sidecar atomically (temporary name, then rename); returns `path`."""
    from safetensors.numpy import save_file

    arr = np.ascontiguousarray(np.asarray(null_text, np.float32))
    if arr.ndim != 2:
        raise ValueError(f"null caption for {path} must be [max_text_tokens, text_dim], got {list(arr.shape)}")
    with atomic_output(path, force=True, make_parent=True) as tmp:
        save_file({KEY: arr}, tmp, metadata={"source": source})
    return path


def find_sidecar(weights: str) -> tuple[np.ndarray, str] | None:
    """(null caption, sidecar path) of the release weights at `weights`, None without a sidecar."""
    side = sidecar_path(weights)
    return (load(side), side) if os.path.isfile(side) else None


def load(path: str, *, text_dim: int | None = None) -> np.ndarray:
    """float32 [max_text_tokens, D] from a sidecar (.safetensors with `null_text`) or a .npy file
    (the main job's dit stage keeps one); errors name the file, the key and the shape."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"null caption file not found: {path}")
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    else:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
        if KEY not in tensors:
            raise ValueError(f"{path} lacks tensor {KEY!r} (has {sorted(tensors)})")
        arr = tensors[KEY]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"{path}: null caption must be a float [max_text_tokens, text_dim] array, got {arr.dtype} {list(arr.shape)}"
        )
    if text_dim is not None and arr.shape[1] != text_dim:
        raise ValueError(f"{path}: null caption has text_dim {arr.shape[1]}, the model has {text_dim}")
    return arr.astype(np.float32)
