"""A procedurally generated captioned video set: coloured shapes moving in named directions.

Every clip is a pure function of (seed, index), so the set is reproducible anywhere and small
enough (default 17 frames of 32×32) for a tiny model to learn on a CPU. Captions name exactly the
three things that vary (colour, shape, direction), so a text-conditioned model can beat a
caption-blind one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
    "purple": (160, 60, 200),
}
SHAPES = ("square", "circle", "triangle")
# (dy, dx) per unit of motion, in image coordinates (y grows downwards).
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


@dataclasses.dataclass(frozen=True)
class ProceduralClip:
    sample_id: str
    caption: str
    frames: np.ndarray  # [T, H, W, 3] uint8
    fps: float
    colour: str
    shape: str
    direction: str


def _mask(shape: str, size: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float) -> np.ndarray:
    r = size / 2
    dy, dx = yy - cy, xx - cx
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "triangle":  # apex up: rows widen linearly from the top to the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def make_clip(
    index: int, *, seed: int = 0, num_frames: int = 17, size: int = 32, fps: float = 8.0, supersample: int = 1
) -> ProceduralClip:
    """Clip `index` of the set. `supersample` = s > 1 renders each pixel as the mean of an s×s grid
    of samples (area coverage: anti-aliased edges, as a camera's optics would blur them) instead of
    one sample at its centre (hard, aliased edges that flicker as the shape moves by sub-pixel
    steps). Captions and the random draw do not depend on it."""
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    obj = max(4, size // 4)
    # The shape crosses about half the frame, so the whole path stays visible.
    travel = size / 2
    dy, dx = DIRECTIONS[direction]
    cy0 = size / 2 - dy * travel / 2 + rng.uniform(-size / 8, size / 8) * (dy == 0)
    cx0 = size / 2 - dx * travel / 2 + rng.uniform(-size / 8, size / 8) * (dx == 0)
    # A fixed, slightly textured background keeps clips from being "static"/"black" to the filters
    # only through the moving object, not through noise.
    bg = np.array([30, 30, 40], np.float32) + rng.uniform(-8, 8, size=3)
    s = int(supersample)
    # Sample points: pixel centres (s = 1), or an s×s grid inside every pixel.
    yy, xx = (np.mgrid[0 : size * s, 0 : size * s].astype(np.float32) + 0.5) / s
    fg = np.asarray(COLOURS[colour], np.float32)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        a = t / max(1, num_frames - 1)
        m = _mask(shape, obj, yy, xx, cy0 + dy * travel * a, cx0 + dx * travel * a)
        cover = m.astype(np.float32).reshape(size, s, size, s).mean(axis=(1, 3))[..., None]
        img = bg * (1.0 - cover) + fg * cover
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return ProceduralClip(
        sample_id=f"procedural-{seed}-{index:06d}",
        caption=f"a {colour} {shape} moving {direction}",
        frames=frames,
        fps=fps,
        colour=colour,
        shape=shape,
        direction=direction,
    )


def generate(
    num_clips: int, *, seed: int = 0, num_frames: int = 17, size: int = 32, fps: float = 8.0, supersample: int = 1
) -> Iterator[ProceduralClip]:
    for i in range(num_clips):
        yield make_clip(i, seed=seed, num_frames=num_frames, size=size, fps=fps, supersample=supersample)
