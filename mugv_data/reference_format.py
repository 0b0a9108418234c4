"""The reference trainer's readable format (docs/reference.md §4.9, §5.3).

  <root>/<csv>: sample_id,source,latent_path,text_feat_path   (paths relative to the CSV's folder)
  latent .pt:   float32 [24, T, H, W] (a leading 1 is squeezed)
  text .pt:     {"y": float32 [1, 1, L, 4096], "mask": bool/int [1, L]}

`source=real` latents are raw VAE posteriors that the loader normalises with the 24 channel
means/stds, (z − mean)/std; `source=generated` latents are used as stored. The reference data prep
writes already-normalised latents yet defaults the CSV to `real`, normalising twice; we normalise
exactly once: import applies the formula only to `real` rows, and export writes our (normalised)
latents as `generated`, or de-normalised as `real` if asked, so the reference loader reads the
same numbers either way.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

import numpy as np

from mugv.io.atomic import atomic_output

# docs/reference.md §6.5 (= mugv.vae_config.RELEASE_LATENT_SHIFT/SCALE, the release VAE buffers).
from mugv.vae_config import RELEASE_LATENT_SCALE as LATENT_STD
from mugv.vae_config import RELEASE_LATENT_SHIFT as LATENT_MEAN

COLUMNS = ("sample_id", "source", "latent_path", "text_feat_path")
SOURCES = ("real", "generated")


def _stats(channels: int):
    if channels != len(LATENT_MEAN):
        raise ValueError(f"reference latents have {len(LATENT_MEAN)} channels, got {channels}")
    mean = np.asarray(LATENT_MEAN, np.float32)[:, None, None, None]
    std = np.asarray(LATENT_STD, np.float32)[:, None, None, None]
    return mean, std


def normalise(latent: np.ndarray, source: str) -> np.ndarray:
    if source == "real":
        mean, std = _stats(latent.shape[0])
        return ((latent - mean) / std).astype(np.float32)
    if source == "generated":
        return latent.astype(np.float32)
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def denormalise(latent: np.ndarray) -> np.ndarray:
    mean, std = _stats(latent.shape[0])
    return (latent * std + mean).astype(np.float32)


def _load_pt(path: str):
    import torch  # the reference format is torch pickles; only this module needs torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_row(root: str, row: dict) -> dict:
    """One CSV row → {sample_id, latents [24,T,H,W] normalised, text [n, D], text_len, source}."""
    lat_path = os.path.join(root, row["latent_path"])
    lat = _load_pt(lat_path)
    lat = lat.float().numpy() if hasattr(lat, "numpy") else np.asarray(lat, np.float32)
    if lat.ndim == 5 and lat.shape[0] == 1:
        lat = lat[0]
    if lat.ndim != 4:
        raise ValueError(f"{lat_path}: latent must be [24, T, H, W] (or [1, 24, T, H, W]), got {lat.shape}")
    text_path = os.path.join(root, row["text_feat_path"])
    t = _load_pt(text_path)
    if not isinstance(t, dict) or "y" not in t or "mask" not in t:
        raise ValueError(f"{text_path}: expected a dict with keys 'y' and 'mask'")
    y = t["y"].float().numpy()
    mask = t["mask"].numpy().astype(bool)
    if y.ndim != 4 or y.shape[:2] != (1, 1) or mask.shape != (1, y.shape[2]):
        raise ValueError(f"{text_path}: y must be [1,1,L,D] and mask [1,L], got {y.shape} and {mask.shape}")
    n = int(mask[0].sum())
    if not mask[0, :n].all():
        raise ValueError(f"{text_path}: mask is not a prefix of valid tokens")
    return {
        "sample_id": row["sample_id"],
        "source": row["source"],
        "latents": normalise(lat, row["source"]),
        "text": y[0, 0, :n],
        "text_len": n,
    }


def read_csv(csv_path: str) -> Iterator[dict]:
    root = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)} (have {reader.fieldnames})")
        for row in reader:
            yield read_row(root, row)


def write_reference(
    examples, out_dir: str, *, source: str = "generated", text_len: int | None = None, csv_name: str = "train.csv"
) -> str:
    """Export normalised examples (dicts with sample_id, latents, text, text_len) to the reference
    layout; `text_len` pads y/mask to a fixed L (the reference uses 300). Returns the CSV path."""
    import torch

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    os.makedirs(os.path.join(out_dir, "latents"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "text_features"), exist_ok=True)
    csv_path = os.path.join(out_dir, csv_name)
    with atomic_output(csv_path, force=True) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for ex in examples:
            sid = ex["sample_id"]
            lat = np.asarray(ex["latents"], np.float32)
            if source == "real":
                lat = denormalise(lat)
            n = int(ex["text_len"])
            L = text_len or n
            if n > L:
                raise ValueError(f"{sid}: caption has {n} tokens, more than text_len={L}")
            text = np.asarray(ex["text"], np.float32)[:n]
            y = np.zeros((1, 1, L, text.shape[1]), np.float32)
            y[0, 0, :n] = text
            mask = np.zeros((1, L), bool)
            mask[0, :n] = True
            lat_rel = os.path.join("latents", f"{sid}.pt")
            txt_rel = os.path.join("text_features", f"{sid}_text.pt")
            torch.save(torch.from_numpy(lat), os.path.join(out_dir, lat_rel))
            torch.save({"y": torch.from_numpy(y), "mask": torch.from_numpy(mask)}, os.path.join(out_dir, txt_rel))
            w.writerow([sid, source, lat_rel, txt_rel])
    return csv_path


def import_reference(
    csv_path: str,
    out_dir: str,
    *,
    fps: float = 24.0,
    name: str = "mugv_clips",
    num_shards: int | None = None,
    latent_dtype: str = "bfloat16",
) -> str:
    """Reference CSV + .pt → mugv_data shards (one bucket per distinct latent shape).

    The reference format carries no fps or pixel frame count (its loader hard-codes fps 24), so
    `fps` is recorded for every clip and `num_frames` is 0 (unknown). Latents are stored as bf16
    by default (the reference trainer casts them to bf16 too); `latent_dtype="float32"` keeps them. Rows are held in
    memory
    (fine for the sizes this path is for: checking parity with the reference trainer).
    """
    from mugv.data.shards import write_shards

    rows = list(read_csv(csv_path))
    shapes = sorted({tuple(r["latents"].shape[1:]) for r in rows})
    channels = {r["latents"].shape[0] for r in rows}
    dims = {r["text"].shape[1] for r in rows}
    if len(channels) != 1 or len(dims) != 1:
        raise ValueError(f"{csv_path}: mixed latent channels {channels} or text dims {dims}")

    def examples():
        for r in rows:
            f, h, w = r["latents"].shape[1:]
            yield {
                "sample_id": r["sample_id"],
                "source_id": f"reference:{r['source']}",
                "caption": "",
                "latents": r["latents"],
                "text": r["text"],
                "text_len": r["text_len"],
                "fps": fps,
                "num_frames": 0,
                "height": h * 8,
                "width": w * 8,
                "bucket_id": shapes.index((f, h, w)),
            }

    return write_shards(
        examples,
        out_dir,
        buckets=shapes,
        latent_channels=channels.pop(),
        text_dim=dims.pop(),
        name=name,
        num_shards=num_shards,
        latent_dtype=latent_dtype,
    )
