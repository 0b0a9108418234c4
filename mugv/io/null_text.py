"""The null caption a DiT was trained with, stored next to its exported release weights.

Both trainers replace dropped captions with a fixed random `null_text` [max_text_tokens, D]
(all rows valid) kept in the training state (JAX `state["null_text"]`, Megatron
`trainer.null_text` / `context_embedder.drop_emb`). It is not a release weight, so the exporters
write it beside the weights as a sidecar, and the sampler uses it as the unconditional input of
classifier-free guidance when no negative prompt is given:

    dit_ema.safetensors                        the release-layout weights
    dit_ema.safetensors.null_text.safetensors  {"null_text": float32 [max_text_tokens, D]},
                                               metadata "source"

The sidecar of a weights file `W` is `W.null_text.safetensors` (its whole name, suffix included,
so `X.safetensors` and `X.pt` side by side each have their own); an index json's is
`<index stem>.null_text.safetensors` in its folder (`model.null_text.safetensors`), a shard
folder's is `null_text.safetensors` inside it. Sidecars written before this rule replaced the
weight suffix (`X.null_text.safetensors`, shared by `X.safetensors` and `X.pt`): they are still
read, when exactly one weights file of that stem is there to own them. Training checkpoints keep
theirs inside (`Reader.null_text`); `python -m converters convert` to release format writes it
from there.
"""

from __future__ import annotations

import os

import numpy as np

from mugv.io.atomic import atomic_output
from mugv.io.release import INDEX_SUFFIX, TORCH_SUFFIXES

KEY = "null_text"
SUFFIX = ".null_text.safetensors"
_INDEX_SUFFIXES = (".safetensors" + INDEX_SUFFIX, INDEX_SUFFIX)
_FILE_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def sidecar_path(weights: str) -> str:
    """Where the null caption of the release weights at `weights` lives (and is written)."""
    weights = os.fspath(weights)
    if os.path.isdir(weights):
        return os.path.join(weights, KEY + ".safetensors")
    head, name = os.path.split(weights)
    for suffix in _INDEX_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return os.path.join(head, name[: -len(suffix)] + SUFFIX)
    return os.path.join(head, name + SUFFIX)


def _stem(weights: str) -> tuple[str, str] | None:
    head, name = os.path.split(os.fspath(weights))
    for suffix in _FILE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return head, name[: -len(suffix)]
    return None


def legacy_sidecar_path(weights: str) -> str | None:
    """The name sidecars had before each weights file got its own (`X.null_text.safetensors`
    for `X.safetensors` and `X.pt` alike): read, and replaced with the weights it belongs to,
    only while exactly one weights file of stem X is there to own it; None otherwise."""
    stem = _stem(weights)
    if stem is None or os.path.isdir(weights):
        return None
    head, base = stem
    owners = [s for s in _FILE_SUFFIXES if os.path.lexists(os.path.join(head, base + s))]
    if owners and owners != [os.fspath(weights)[len(os.path.join(head, base)) :]]:
        return None
    return os.path.join(head, base + SUFFIX)


def existing_sidecar(weights: str) -> str | None:
    """The sidecar file of `weights` that is there: its own, else an unambiguous older one."""
    for path in (sidecar_path(weights), legacy_sidecar_path(weights)):
        if path and os.path.isfile(path):
            return path
    return None


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
    side = existing_sidecar(weights)
    return (load(side), side) if side else None


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
