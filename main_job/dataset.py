"""The training clips: procedural captioned shapes (minus held-out combinations) plus the bundled
real videos, all fitted to one pixel bucket, stored as uint8 arrays with their captions.

Held-out prompts are (colour, shape, direction) combinations removed from training; each comes
with its ground-truth rendering (never trained on), used for image-to-video conditioning and shown
in the report.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tqdm import tqdm

from mugv.data import procedural
from mugv.io.atomic import atomic_output, write_json

CLIPS_FILE = "clips.npz"
META_FILE = "clips.json"


def _fit(frames: np.ndarray, num_frames: int, size: int) -> np.ndarray:
    from mugv_data.encode import PixelBucket, resize_crop

    out = resize_crop(frames, PixelBucket(num_frames, size, size))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _real_clips(cfg, out_dir: str) -> list[dict]:
    """Bundled real videos through the data pipeline's shot split and filters. The filters are
    relaxed (the bundled files are small, short or soft): here they only cut shots and drop
    broken or too-short pieces; what was kept or dropped is in manifest.jsonl."""
    from mugv.data import bundled
    from mugv_data import clips

    paths = bundled.files(cfg.bundled)
    fcfg = clips.FilterConfig(
        min_seconds=0.5,
        min_height=14,
        min_width=14,
        sharpness_min=0.0,
        sharpness_max=1e12,
        motion_min=0.0,
        motion_max=256.0,
    )
    kept = clips.process_videos(
        paths, os.path.join(out_dir, "manifest.jsonl"), fcfg, max_frames=int(cfg.max_frames), progress=True
    )
    out = []
    for c in kept:
        if c.frames.shape[0] < cfg.frames:
            continue
        out.append(
            {
                "id": c.clip_id,
                "caption": bundled.caption_for(c.video),
                "source": c.video,
                "fps": float(c.fps),
                "frames": _fit(c.frames, int(cfg.frames), int(cfg.size)),
            }
        )
    return out


def build(cfg, seed: int, out_dir: str) -> dict:
    """Write clips.npz ([N, T, H, W, 3] uint8 training clips, [K, T, H, W, 3] held-out ground
    truths) and clips.json (captions and attributes) into out_dir; returns a summary."""
    held = {tuple(h) for h in cfg.held_out}
    for h in held:
        if h[0] not in procedural.COLOURS or h[1] not in procedural.SHAPES or h[2] not in procedural.DIRECTIONS:
            raise ValueError(f"config.data.held_out: {h} is not a (colour, shape, direction) of mugv.data.procedural")
    train, truths = [], {}
    ss = int(cfg.get("supersample", 1))
    for clip in tqdm(
        procedural.generate(
            int(cfg.procedural_count),
            seed=seed,
            num_frames=int(cfg.frames),
            size=int(cfg.size),
            fps=float(cfg.fps),
            supersample=ss,
        ),
        total=int(cfg.procedural_count),
        desc="procedural clips",
        unit="clip",
    ):
        key = (clip.colour, clip.shape, clip.direction)
        if key in held:
            truths.setdefault(key, clip)
            continue
        train.append(
            {
                "id": clip.sample_id,
                "caption": clip.caption,
                "source": "procedural",
                "fps": clip.fps,
                "frames": clip.frames,
                "colour": clip.colour,
                "shape": clip.shape,
                "direction": clip.direction,
            }
        )
    # A held-out combination the draw never produced still gets a ground truth: render it from
    # further indices of the same generator.
    index = int(cfg.procedural_count)
    while len(truths) < len(held):
        clip = procedural.make_clip(
            index, seed=seed, num_frames=int(cfg.frames), size=int(cfg.size), fps=float(cfg.fps), supersample=ss
        )
        key = (clip.colour, clip.shape, clip.direction)
        if key in held:
            truths.setdefault(key, clip)
        index += 1
    real = _real_clips(cfg, out_dir) if cfg.bundled else []
    train += real
    held_out = [
        {
            "caption": truths[k].caption,
            "colour": k[0],
            "shape": k[1],
            "direction": k[2],
            "fps": truths[k].fps,
            "truth_id": truths[k].sample_id,
        }
        for k in sorted(held)
    ]
    meta = {
        "train": [{k: v for k, v in c.items() if k != "frames"} for c in train],
        "held_out": held_out,
        "frames": int(cfg.frames),
        "size": int(cfg.size),
    }
    with atomic_output(os.path.join(out_dir, CLIPS_FILE), force=True) as tmp, open(tmp, "wb") as f:
        np.savez(
            f, train=np.stack([c["frames"] for c in train]), held_out=np.stack([truths[k].frames for k in sorted(held)])
        )
    write_json(os.path.join(out_dir, META_FILE), meta, indent=1)
    return {
        "num_train": len(train),
        "num_real": len(real),
        "num_held_out": len(held_out),
        "real_sources": sorted({c["source"] for c in real}),
    }


def load(out_dir: str) -> tuple[dict, np.ndarray, np.ndarray]:
    with open(os.path.join(out_dir, META_FILE)) as f:
        meta = json.load(f)
    arrays = np.load(os.path.join(out_dir, CLIPS_FILE))
    return meta, arrays["train"], arrays["held_out"]
