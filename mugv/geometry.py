"""Pixel → latent → token geometry under the released 8×8×8 video VAE and the DiT patching.

The VAE downsamples height and width by 8 (three stride-2 convolutions that round down) and time
by 8 in groups of 8 frames. The release encodes either the whole clip at once (front zero-padding
to a multiple of 8) or in chunks of `micro_frame_size` pixel frames (its default is 48).
"""

from __future__ import annotations

import math

from mugv.config import DiTConfig

SPATIAL_DOWNSAMPLE = 8
TEMPORAL_DOWNSAMPLE = 8


def latent_frames(num_frames: int, micro_frame_size: int | None = None) -> int:
    """Latent frames the release VAE produces for `num_frames` pixel frames.

    Whole-clip encoding gives ceil(T/8). Chunked encoding (the release's `get_latent_size`) gives
    (micro/8)·⌊T/micro⌋ + ⌈(T mod micro)/8⌉ — e.g. 105 → 14 and 73 → 10 with micro = 48.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if micro_frame_size is None:
        return math.ceil(num_frames / TEMPORAL_DOWNSAMPLE)
    if micro_frame_size % TEMPORAL_DOWNSAMPLE:
        raise ValueError(f"micro_frame_size must be a multiple of 8, got {micro_frame_size}")
    full, rest = divmod(num_frames, micro_frame_size)
    return (micro_frame_size // TEMPORAL_DOWNSAMPLE) * full + math.ceil(rest / TEMPORAL_DOWNSAMPLE)


def latent_spatial(height: int, width: int) -> tuple[int, int]:
    """Latent (h, w) for a pixel (height, width): each stride-2 stage rounds down."""
    if height < SPATIAL_DOWNSAMPLE or width < SPATIAL_DOWNSAMPLE:
        raise ValueError(f"pixel size {height}x{width} is smaller than one 8x8 latent cell")
    return height // SPATIAL_DOWNSAMPLE, width // SPATIAL_DOWNSAMPLE


def latent_shape(num_frames: int, height: int, width: int, micro_frame_size: int | None = None) -> tuple[int, int, int]:
    """(T', h, w) latent grid for a pixel clip."""
    return (latent_frames(num_frames, micro_frame_size), *latent_spatial(height, width))


def patch_grid(latent: tuple[int, int, int], config: DiTConfig) -> tuple[int, int, int]:
    """Patch grid (T'', H'', W''): the patch embed zero-pads each axis up to a patch multiple."""
    return tuple(math.ceil(n / p) for n, p in zip(latent, config.patch_size))


def num_video_tokens(latent: tuple[int, int, int], config: DiTConfig) -> int:
    t, h, w = patch_grid(latent, config)
    return t * h * w


def num_tokens(latent: tuple[int, int, int], config: DiTConfig) -> int:
    """Self-attention sequence length: video tokens plus the learned start and end tokens."""
    return num_video_tokens(latent, config) + 2


def tokens_for_clip(
    num_frames: int, height: int, width: int, config: DiTConfig, micro_frame_size: int | None = None
) -> int:
    return num_tokens(latent_shape(num_frames, height, width, micro_frame_size), config)
