"""Latents files: what `python -m mugv_jax.sample` and `python -m mugv_jax.vae encode` write and
`python -m mugv_jax.vae decode` reads.

A latents file is `.safetensors` (tensor `latents`, metadata in the header) or `.npy`, with an
optional `<stem>.json` sidecar holding the same metadata. `latents` is [C, T', h, w] (one encoded
video) or [B, C, T', h, w] (sampled). Safetensors metadata maps strings to strings, so every value
is stored as JSON and read back typed; the fields decoding relies on are checked:

    num_frames  int    pixel frames the latents decode to
    height      int    pixel height
    width       int    pixel width
    fps         float  frame rate of the decoded video
    model       str    the DiT preset that sampled them (sampled latents)

Files written by the sample command before this module stored plain strings
(`pixel_size "17x64x112"`); they are read too.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mugv.io.atomic import atomic_output, write_json

TENSOR = "latents"
FIELDS = {"num_frames": int, "height": int, "width": int, "fps": float, "model": str}
SUFFIXES = (".safetensors", ".npy")


def sidecar_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def check_meta(meta: dict, where: str) -> dict:
    """`meta` with the typed fields checked (ints stay ints, fps a float); errors name `where`."""
    out = dict(meta)
    for key, kind in FIELDS.items():
        value = out.get(key)
        if value is None:
            continue
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
        elif kind is int and isinstance(value, float) and value.is_integer():
            out[key] = int(value)
        elif not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: metadata {key}={value!r} must be {kind.__name__}")
    return out


def write(path: str, latents: np.ndarray, meta: dict, *, sidecar: bool = False, force: bool = True) -> str:
    """Write `latents` (float32) to `path` (.safetensors or .npy) with `meta`, under a temporary
    name renamed when complete; `sidecar` also writes `<stem>.json`. Returns `path`."""
    if not path.endswith(SUFFIXES):
        raise ValueError(f"{path}: latents go to .safetensors or .npy")
    meta = check_meta(meta, path)
    z = np.asarray(latents, np.float32, order="C")
    with atomic_output(path, force=force, make_parent=True) as tmp:
        if path.endswith(".npy"):
            with open(tmp, "wb") as f:
                np.save(f, z)
        else:
            from safetensors.numpy import save_file

            save_file({TENSOR: z}, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    if sidecar:
        write_json(sidecar_path(path), meta, indent=None)
    return path


def _header_value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # a plain string (files written before the values were JSON)


def _legacy(meta: dict, path: str) -> dict:
    size = meta.get("pixel_size")
    if isinstance(size, str) and "num_frames" not in meta:
        try:
            meta["num_frames"], meta["height"], meta["width"] = (int(v) for v in size.split("x"))
        except ValueError:
            raise ValueError(f"{path}: metadata pixel_size={size!r} is not FRAMESxHEIGHTxWIDTH") from None
    return meta


def read(path: str) -> tuple[np.ndarray, dict]:
    """(latents [B, C, T', h, w] float32, metadata) of a latents file; the sidecar, when present,
    wins over the header. Errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latents file not found: {path}")
    meta: dict = {}
    if path.endswith(".npy"):
        z = np.load(path)
    elif path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            if TENSOR not in f.keys():
                raise ValueError(f"{path} has no tensor '{TENSOR}' (found {sorted(f.keys())})")
            z = f.get_tensor(TENSOR)
            meta = {k: _header_value(v) for k, v in (f.metadata() or {}).items()}
    else:
        raise ValueError(f"{path}: latents must be .npy or .safetensors")
    side = sidecar_path(path)
    if os.path.isfile(side):
        with open(side) as f:
            meta.update(json.load(f))
    if z.ndim == 4:
        z = z[None]
    if z.ndim != 5:
        raise ValueError(f"{path}: latents must be [C, T', h, w] or [B, C, T', h, w], got shape {list(z.shape)}")
    return np.asarray(z, np.float32), check_meta(_legacy(meta, path), path)
