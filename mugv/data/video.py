"""Video decoding (PyAV), shared by data preparation and the VAE's video readers."""

from __future__ import annotations

import numpy as np


class VideoDecodeError(Exception):
    """A video that PyAV cannot open or decode; carries the path for the manifest."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def decode_video(path: str, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """All frames as uint8 RGB [T, H, W, 3] and the stream's average fps."""
    import av  # local: the loader side must not need PyAV

    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoDecodeError:
        raise
    except Exception as e:  # PyAV raises a zoo of FFmpeg error types; all mean "unreadable"
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    if not frames:
        raise VideoDecodeError(path, "no decodable frames")
    if fps <= 0:
        raise VideoDecodeError(path, "stream has no frame rate")
    return np.stack(frames), fps
