"""Pictures for the report: nearest-neighbour upscaling and PNG frame grids through Pillow (its mp4s
go through mugv.data.video.write_mp4)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def upscale(video: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale of [..., H, W, 3]: 32-px clips are unreadable at native size and
    yuv420 chroma subsampling would smear their colours."""
    if factor == 1:
        return video
    return video.repeat(factor, axis=-3).repeat(factor, axis=-2)


def frame_grid(path: str, rows: Sequence[tuple[str, np.ndarray]], *, every: int = 2, scale: int = 3) -> str:
    """A PNG with one labelled row of frames (every `every`-th) per (label, video [T, H, W, 3])."""
    from PIL import Image, ImageDraw

    label_h, pad = 14, 2
    tiles = [(label, upscale(np.asarray(v, np.uint8)[::every], scale)) for label, v in rows]
    n = max(len(v) for _, v in tiles)
    h, w = tiles[0][1].shape[1:3]
    img = Image.new("RGB", (n * (w + pad) + pad, len(tiles) * (h + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, (label, v) in enumerate(tiles):
        y = pad + r * (h + label_h + pad)
        draw.text((pad, y), label, fill=(0, 0, 0))
        for i, frame in enumerate(v):
            img.paste(Image.fromarray(frame), (pad + i * (w + pad), y + label_h))
    tmp = f"{path}.tmp.png"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
