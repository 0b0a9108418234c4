"""Pluggable clip scorers and captioners, each behind a small interface and a name registry.

  motion      frames → mean dense optical-flow magnitude (px/frame) over 3 evenly spaced
              consecutive-frame pairs (start, middle, end); docs/reference.md §5.1 keeps [1, 20].
              Default `farneback` (OpenCV's dense Farnebäck flow, offline); `frame_difference`
              is the old mean |Δluma| score; RAFT plugs in as a flow function:
              `register_motion_scorer("raft", lambda: FlowMotionScorer(my_raft_flow))`.
  aesthetic   frames → LAION-style aesthetic score (paper keeps ≥ 4.5). No predictor ships
              offline (it needs CLIP weights), so none is registered by default and the filter
              is off unless one is given.
  captioner   (frames, fps) → caption (the paper's Qwen2-VL). None ships offline; captions come
              from a CSV/JSONL manifest (`ManifestCaptions`) or a registered captioner.

Registries map a name to a zero-argument factory, so a scorer can be named on the command line and
built lazily inside each (Beam) worker.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from typing import Protocol

import numpy as np


class MotionScorer(Protocol):
    name: str

    def __call__(self, frames: np.ndarray) -> float: ...


class AestheticScorer(Protocol):
    name: str

    def __call__(self, frames: np.ndarray) -> float: ...


class Captioner(Protocol):
    name: str

    def __call__(self, frames: np.ndarray, fps: float) -> str: ...


def pair_starts(num_frames: int, k: int = 3) -> list[int]:
    """First frames of k evenly spaced consecutive pairs (start, middle, end)."""
    if num_frames < 2:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, num_frames - 2, k)})


def _gray(frame: np.ndarray) -> np.ndarray:
    f = frame.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def farneback_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow [H, W, 2] (px) from RGB uint8 frame a to b with OpenCV's Farnebäck method."""
    import cv2

    ga = np.clip(_gray(a), 0, 255).astype(np.uint8)
    gb = np.clip(_gray(b), 0, 255).astype(np.uint8)
    # OpenCV's documented example parameters; 3 pyramid levels see motions up to ~20 px.
    return cv2.calcOpticalFlowFarneback(
        ga, gb, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
    )


class FlowMotionScorer:
    """Mean flow magnitude over the 3 sampled pairs, for any dense flow function (a, b) → [H, W, 2]."""

    def __init__(self, flow_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], name: str = "flow"):
        self.flow_fn, self.name = flow_fn, name

    def __call__(self, frames: np.ndarray) -> float:
        starts = pair_starts(frames.shape[0])
        if not starts:
            return 0.0
        mags = []
        for i in starts:
            flow = np.asarray(self.flow_fn(frames[i], frames[i + 1]), np.float32)
            if flow.shape != (*frames.shape[1:3], 2):
                raise ValueError(
                    f"motion scorer {self.name!r}: flow must be [H, W, 2] = {(*frames.shape[1:3], 2)}, got {flow.shape}"
                )
            mags.append(float(np.sqrt((flow**2).sum(-1)).mean()))
        return float(np.mean(mags))


class FrameDifferenceScorer:
    """Mean |Δluma| (0–255) of the sampled pairs: cheap, but not in the paper's flow units."""

    name = "frame_difference"

    def __call__(self, frames: np.ndarray) -> float:
        starts = pair_starts(frames.shape[0])
        if not starts:
            return 0.0
        return float(np.mean([np.abs(_gray(frames[i + 1]) - _gray(frames[i])).mean() for i in starts]))


MOTION_SCORERS: dict[str, Callable[[], MotionScorer]] = {
    "farneback": lambda: FlowMotionScorer(farneback_flow, "farneback"),
    "frame_difference": FrameDifferenceScorer,
}
AESTHETIC_SCORERS: dict[str, Callable[[], AestheticScorer]] = {}
CAPTIONERS: dict[str, Callable[[], Captioner]] = {}
_REGISTRIES = {"motion": MOTION_SCORERS, "aesthetic": AESTHETIC_SCORERS, "captioner": CAPTIONERS}


def _register(kind: str, name: str, factory: Callable) -> None:
    _REGISTRIES[kind][name] = factory


def register_motion_scorer(name: str, factory: Callable[[], MotionScorer]) -> None:
    _register("motion", name, factory)


def register_aesthetic_scorer(name: str, factory: Callable[[], AestheticScorer]) -> None:
    _register("aesthetic", name, factory)


def register_captioner(name: str, factory: Callable[[], Captioner]) -> None:
    _register("captioner", name, factory)


def build(kind: str, name: str | None):
    """The registered `kind` ('motion', 'aesthetic', 'captioner') called `name`; None for None."""
    if name is None:
        return None
    registry = _REGISTRIES[kind]
    if name not in registry:
        raise ValueError(
            f"unknown {kind} scorer {name!r}; registered: {sorted(registry) or 'none'} "
            f"(register one with mugv_data.scorers.register_{'captioner' if kind == 'captioner' else kind + '_scorer'})"
        )
    return registry[name]()


class ManifestCaptions:
    """Captions (and optional aesthetic scores) from a CSV or JSONL file.

    Rows have `caption` and a `clip_id` (`video#NNNN`, as in manifest.jsonl) or a `video`
    (basename, for every clip of that video), and optionally `aesthetic`. Clip rows win over video rows.
    """

    def __init__(self, path: str):
        self.path = path
        if path.endswith(".csv"):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        self.by_clip, self.by_video = {}, {}
        for n, r in enumerate(rows):
            if "caption" not in r or not (r.get("clip_id") or r.get("video")):
                raise ValueError(f"{path} row {n + 1}: needs 'caption' and 'clip_id' or 'video', got {sorted(r)}")
            aes = r.get("aesthetic")
            entry = (r["caption"], float(aes) if aes not in (None, "") else None)
            if r.get("clip_id"):
                self.by_clip[r["clip_id"]] = entry
            else:
                self.by_video[r["video"]] = entry

    def lookup(self, clip_id: str, video: str) -> tuple[str, float | None] | None:
        return self.by_clip.get(clip_id) or self.by_video.get(video)

    def covers(self, video: str) -> bool:
        """Whether any row names `video` (a video row, or a clip row of one of its clips)."""
        return bool(self.by_video.get(video, ("",))[0]) or any(
            c.startswith(f"{video}#") and cap for c, (cap, _) in self.by_clip.items()
        )
