"""Which frames the release encodes together and how it windows a decode (pure Python).

These plans are the whole of the pipeline's temporal orchestration; everything numerically
surprising about the release (first-frame replication only in chunked mode, zero padding at the
*front*, decode windows cropped at the front) is decided here, from static shapes alone.
"""

from __future__ import annotations

import dataclasses

from mugv.vae_config import TEMPORAL_GROUP as G

ZERO = -1  # slot index of an all-zero padding frame


def first_frame_copies(num_frames: int) -> int:
    """Copies of frame 0 that chunked encoding prepends (the first-frame rule): G − 1 for a clip
    of 8k+1 frames, else none. Decoding the latents of such a clip yields these copies in front."""
    return G - 1 if num_frames % G == 1 else 0


def encode_calls(num_frames: int, micro_frame_size: int | None) -> list[list[list[int]]]:
    """Per temporal-encode call, its 8-frame groups as pixel-frame indices (ZERO = zero frame).

    Whole clip: one call, zero frames prepended up to a multiple of 8. Chunked: if T ≡ 1 (mod 8)
    seven copies of frame 0 are prepended first (the first-frame rule, which the whole-clip path
    does not apply), then `micro_frame_size`-frame chunks are each front-padded with zeros.
    """
    if num_frames < 1:
        raise ValueError(f"cannot encode {num_frames} frames")
    frames = list(range(num_frames))
    if micro_frame_size is None:
        chunks = [frames]
    else:
        frames = [0] * first_frame_copies(num_frames) + frames
        chunks = [frames[i : i + micro_frame_size] for i in range(0, len(frames), micro_frame_size)]
    calls = []
    for chunk in chunks:
        padded = [ZERO] * (-len(chunk) % G) + chunk
        calls.append([padded[i : i + G] for i in range(0, len(padded), G)])
    return calls


@dataclasses.dataclass(frozen=True)
class DecodeWindow:
    latent_start: int
    latent_stop: int
    num_frames: int  # the `num_frames` this window's temporal decode is asked for
    crop_front: int  # frames dropped from the front of its 8·n decoded frames


def decode_windows(num_latents: int, num_frames: int, micro_frame_size: int | None) -> list[DecodeWindow]:
    """The release's decode windows: all latents at once, or `micro/8` latents per window.

    Window k is told `min(micro, remaining)` frames, then `remaining -= micro`; each window drops
    (8 − n mod 8) mod 8 frames from its *front*.
    """
    if num_latents < 1:
        raise ValueError(f"cannot decode {num_latents} latent frames")

    def crop(n: int) -> int:
        return (G - n % G) % G

    if micro_frame_size is None:
        return [DecodeWindow(0, num_latents, num_frames, crop(num_frames))]
    step = micro_frame_size // G
    windows, remaining = [], num_frames
    for start in range(0, num_latents, step):
        n = min(micro_frame_size, remaining)
        if n < 1:
            raise ValueError(
                f"{num_latents} latent frames need more than num_frames={num_frames} "
                f"output frames in windows of {micro_frame_size}"
            )
        windows.append(DecodeWindow(start, min(start + step, num_latents), n, crop(n)))
        remaining -= micro_frame_size
    return windows
