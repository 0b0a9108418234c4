"""Clips → shard examples: fit each clip to a bucket, VAE-encode in batches, encode captions.

Pixel handling fixes the reference data prep (docs/reference.md §5.3): frames go to the VAE in [−1, 1] (the
reference fed [0, 1]), the VAE's own normalisation is applied once, and each clip's real fps is
recorded. A clip is fitted to the bucket of closest aspect ratio among those with no more frames
than it has (ties: more frames, then the closest pixel count); it is resized to fill (antialiased triangle
filter) and centre-cropped in space and time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

from mugv.vae_config import latent_size


@dataclasses.dataclass(frozen=True)
class PixelBucket:
    frames: int
    height: int
    width: int

    def __post_init__(self):
        if self.height % 16 or self.width % 16:
            # /8 for the VAE, then the DiT's (1, 2, 2) patch needs even latent sizes.
            raise ValueError(f"bucket {self}: height and width must be multiples of 16")


@dataclasses.dataclass
class ClipInput:
    sample_id: str
    source_id: str
    caption: str
    frames: np.ndarray  # [T, H, W, 3] uint8
    fps: float


def choose_bucket(num_frames: int, height: int, width: int, buckets: Sequence[PixelBucket]) -> int | None:
    best, key = None, None
    for i, b in enumerate(buckets):
        if b.frames > num_frames:
            continue
        k = (
            abs(math.log((b.width / b.height) / (width / height))),
            -b.frames,
            abs(math.log(b.height * b.width / (height * width))),
        )
        if key is None or k < key:
            best, key = i, k
    return best


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    support = max(1.0, scale)  # widen the triangle when shrinking: antialiasing
    centres = (np.arange(n_out) + 0.5) * scale
    x = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(x[None] - centres[:, None]) / support)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_crop(frames: np.ndarray, bucket: PixelBucket) -> np.ndarray:
    """[T, H, W, 3] uint8 → [bucket.frames, h, w, 3] float32 in [0, 255]: fill, then centre crop."""
    t, h, w, _ = frames.shape
    if t < bucket.frames:
        raise ValueError(f"clip has {t} frames, bucket {bucket} needs {bucket.frames}")
    t0 = (t - bucket.frames) // 2
    clip = frames[t0 : t0 + bucket.frames].astype(np.float32)
    s = max(bucket.height / h, bucket.width / w)
    rh, rw = max(bucket.height, round(h * s)), max(bucket.width, round(w * s))
    y0, x0 = (rh - bucket.height) // 2, (rw - bucket.width) // 2
    mh = _resample_matrix(h, rh)[y0 : y0 + bucket.height]
    mw = _resample_matrix(w, rw)[x0 : x0 + bucket.width]
    return np.einsum("yh,thwc,xw->tyxc", mh, clip, mw, optimize=True)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] in [0, 255] → [3, T, H, W] in [−1, 1] (the VAE's training range)."""
    return (pixels.transpose(3, 0, 1, 2) / 127.5 - 1.0).astype(np.float32)


class LatentEncoder(Protocol):
    latent_channels: int

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]: ...

    def encode(self, x: np.ndarray) -> np.ndarray:
        """[B, 3, T, H, W] in [−1, 1] → normalised latents [B, C, T', H/8, W/8] float32."""
        ...


class JaxVAEEncoder:
    """The JAX video VAE (posterior mode). `path=None` builds random weights: only for demos and
    tests, since the latents then mean nothing."""

    def __init__(
        self,
        path: str | None = None,
        preset: str = "tiny",
        *,
        seed: int = 0,
        compiler_options: dict | None = None,
        **config_overrides,
    ):
        from flax import nnx

        import mugv_jax.vae as vae

        self.config = vae.get_vae_config(preset, **config_overrides)
        model = vae.load(path, self.config) if path else vae.VideoVAE(self.config, rngs=nnx.Rngs(seed))
        self._jv = vae.jit(model, compiler_options)
        self.latent_channels = self.config.embed_dim

    def latent_shape(self, frames, height, width):
        return latent_size(self.config, frames, height, width)

    def encode(self, x):
        return np.asarray(self._jv.encode(x), np.float32)


class PatchMeanEncoder:
    """A deterministic numpy stand-in with the VAE's shapes (no micro-chunking): channel c·8+k of
    latent frame t is the 8×8 spatial mean of colour c in frame 8t+k (front zero-padded like the VAE).
    For tests and fast smoke runs; it is not a VAE."""

    latent_channels = 24

    def latent_shape(self, frames, height, width):
        return math.ceil(frames / 8), height // 8, width // 8

    def encode(self, x):
        b, c, t, h, w = x.shape
        pad = (-t) % 8
        x = np.concatenate([np.zeros((b, c, pad, h, w), x.dtype), x], axis=2)
        t2, h2, w2 = x.shape[2] // 8, h // 8, w // 8
        z = x[..., : h2 * 8, : w2 * 8].reshape(b, c, t2, 8, h2, 8, w2, 8).mean(axis=(5, 7))
        return z.transpose(0, 1, 3, 2, 4, 5).reshape(b, c * 8, t2, h2, w2).astype(np.float32)


def encode_clips(
    clips: Iterable[ClipInput],
    buckets: Sequence[PixelBucket],
    latent_encoder: LatentEncoder,
    text_encoder,
    *,
    batch_size: int = 4,
    on_drop: Callable[[str, str], None] | None = None,
) -> Iterator[dict]:
    """Shard examples (see shards.py). Clips are batched per bucket; a clip that fits no bucket is
    reported through `on_drop(sample_id, reason)` and skipped."""
    pending: dict[int, list[ClipInput]] = {i: [] for i in range(len(buckets))}

    def flush(i: int) -> Iterator[dict]:
        group, pending[i] = pending[i], []
        if not group:
            return
        b = buckets[i]
        x = np.stack([to_model_input(resize_crop(c.frames, b)) for c in group])
        z = latent_encoder.encode(x)
        expect = (len(group), latent_encoder.latent_channels, *latent_encoder.latent_shape(b.frames, b.height, b.width))
        if z.shape != expect:
            raise ValueError(f"latent encoder returned {z.shape} for bucket {b}, expected {expect}")
        feats, mask = text_encoder.encode([c.caption for c in group])
        for c, zi, fi, mi in zip(group, z, feats, mask):
            n = int(mi.sum())
            yield {
                "sample_id": c.sample_id,
                "source_id": c.source_id,
                "caption": c.caption,
                "latents": zi,
                "text": fi[:n],
                "text_len": n,
                "fps": float(c.fps),
                "num_frames": b.frames,
                "height": b.height,
                "width": b.width,
                "bucket_id": i,
            }

    for clip in clips:
        t, h, w, _ = clip.frames.shape
        i = choose_bucket(t, h, w, buckets)
        if i is None:
            if on_drop is not None:
                on_drop(clip.sample_id, f"no_bucket: {t} frames of {h}x{w}")
            continue
        pending[i].append(clip)
        if len(pending[i]) >= batch_size:
            yield from flush(i)
    for i in pending:
        yield from flush(i)


def latent_buckets(buckets: Sequence[PixelBucket], latent_encoder: LatentEncoder) -> list[tuple[int, int, int]]:
    return [latent_encoder.latent_shape(b.frames, b.height, b.width) for b in buckets]
