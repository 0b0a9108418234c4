"""Video files through PyAV: decoding (data preparation, the VAE's video readers) and the one H.264
mp4 writer (the VAE's decode command, the main job's report, test fixtures)."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np


class VideoDecodeError(Exception):
    """A video that PyAV cannot open or decode, or that decodes with errors (`damaged`: FFmpeg
    concealed them, so some frames are wrong); carries the path for the manifest."""

    def __init__(self, path: str, reason: str, *, damaged: bool = False):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.damaged = path, reason, damaged


def decode_video(path: str, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """All frames as uint8 RGB [T, H, W, 3] and the stream's average fps.

    FFmpeg conceals many bitstream errors (a few changed bytes in an H.264 mp4 decode "fine" with
    a tenth of the frames wrong) and only logs them: any error the decoder logs makes the video
    damaged (VideoDecodeError with `damaged`), never frames to train on."""
    import av  # local: the loader side must not need PyAV
    import av.logging

    frames = []
    previous, skipped = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)  # an error another video logged before is this one's too
    try:
        with av.logging.Capture(True) as logs, av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            # One decoding thread: FFmpeg's frame threads log from themselves, out of this
            # thread's capture (videos are decoded in parallel one per worker instead).
            stream.codec_context.thread_count = 1
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoDecodeError:
        raise
    except Exception as e:  # PyAV raises a zoo of FFmpeg error types; all mean "unreadable"
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    finally:
        av.logging.set_level(previous)
        av.logging.set_skip_repeated(skipped)
    errors = [f"{name}: {message.strip()}" for level, name, message in logs if level <= av.logging.ERROR]
    if errors:
        shown = "; ".join(errors[:3]) + (f"; … {len(errors) - 3} more" if len(errors) > 3 else "")
        raise VideoDecodeError(path, f"damaged: the decoder reported {len(errors)} errors ({shown})", damaged=True)
    if not frames:
        raise VideoDecodeError(path, "no decodable frames")
    if fps <= 0:
        raise VideoDecodeError(path, "stream has no frame rate")
    return np.stack(frames), fps


def write_mp4(path: str, frames: np.ndarray, fps: float, *, crf: int = 18) -> str:
    """uint8 frames [T, H, W, 3] → H.264 yuv420p mp4 at `path`, which plays in browsers.

    Written to a temporary name and renamed, so `path` is whole or absent. yuv420p needs even H
    and W. The rate is `fps` as a fraction (29.97 stays 29.97); crf 18 is near visually lossless,
    since the files are looked at to judge colours and reconstructions."""
    import av  # local: the loader side must not need PyAV

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs even frame sizes, got {h}x{w}")
    if not fps or fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    tmp = f"{path}.tmp.mp4"
    try:
        with av.open(tmp, "w") as out:
            stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
