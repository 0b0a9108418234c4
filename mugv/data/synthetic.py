"""The trainer's data interface and a synthetic source to test and demo with.

A *source* returns batch `i` as a dict of numpy arrays, deterministically from its index:
  latents [B, C, F, H, W] float32 (normalised VAE latents), y [B, 1, L, D] float32 caption
  features, mask [B, L] int32 (1 = valid token, a prefix), fps [B] float32.
Every batch has one latent shape (a *bucket*); the set of shapes is small and known ahead, so the
compiled step is cached per bucket. The iterator's state is a JSON-able dict saved with every
checkpoint, so a resumed run reads exactly the batches an uninterrupted run would have.
The array_record/grain source of the data-pipeline issue implements the same interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Bucket:
    frames: int  # latent frames
    height: int  # latent height
    width: int  # latent width
    batch_size: int  # global batch size for this shape

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)


class BatchSource(Protocol):
    buckets: Sequence[Bucket]

    def batch(self, index: int) -> dict[str, np.ndarray]: ...


class DataIterator:
    """Walks a source by index; `get_state`/`set_state` make the position part of a checkpoint."""

    def __init__(self, source: BatchSource, start: int = 0):
        self.source = source
        self.position = start

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.source.batch(self.position)
        self.position += 1
        return batch

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


class SyntheticTextToLatent:
    """Latents that are a deterministic function of the caption.

    `num_prompts` captions (random features with different valid lengths) each own a fixed latent
    pattern; batch `i` draws captions from a generator seeded by (seed, i). A model that reads the
    text can drive the velocity loss far below the best caption-blind (constant) prediction, whose
    loss is 1 + the per-element variance of the patterns across captions.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        *,
        in_channels: int,
        text_dim: int,
        text_len: int = 8,
        num_prompts: int = 4,
        fps: float = 24.0,
        seed: int = 0,
    ):
        if not buckets:
            raise ValueError("SyntheticTextToLatent needs at least one bucket")
        self.buckets = list(buckets)
        self.in_channels, self.text_dim, self.text_len = in_channels, text_dim, text_len
        self.fps, self.seed, self.num_prompts = fps, seed, num_prompts
        rng = np.random.default_rng(seed)
        self.text = rng.standard_normal((num_prompts, text_len, text_dim)).astype(np.float32)
        self.lengths = rng.integers(max(1, text_len // 2), text_len + 1, size=num_prompts)
        self.text_mask = (np.arange(text_len)[None] < self.lengths[:, None]).astype(np.int32)
        self.text *= self.text_mask[:, :, None]
        self._patterns = {}

    def patterns(self, bucket: Bucket) -> np.ndarray:
        """[num_prompts, C, F, H, W]: smooth per-caption latents of unit scale."""
        if bucket.latent_shape not in self._patterns:
            rng = np.random.default_rng([self.seed, *bucket.latent_shape])
            f, h, w = bucket.latent_shape
            coeff = rng.standard_normal((self.num_prompts, self.in_channels, 3))
            tt, hh, ww = np.meshgrid(np.linspace(-1, 1, f), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
            basis = np.stack([np.sin(np.pi * hh + tt), np.cos(np.pi * ww - tt), hh * ww], axis=0)
            self._patterns[bucket.latent_shape] = np.einsum("pcb,bfhw->pcfhw", coeff, basis).astype(np.float32)
        return self._patterns[bucket.latent_shape]

    def bucket_for(self, index: int) -> Bucket:
        return self.buckets[index % len(self.buckets)]

    def batch(self, index: int) -> dict[str, np.ndarray]:
        bucket = self.bucket_for(index)
        rng = np.random.default_rng([self.seed, 1, index])
        ids = rng.integers(0, self.num_prompts, size=bucket.batch_size)
        return {
            "latents": self.patterns(bucket)[ids],
            "y": self.text[ids][:, None],
            "mask": self.text_mask[ids],
            "fps": np.full((bucket.batch_size,), self.fps, np.float32),
            "prompt_id": ids.astype(np.int32),
        }

    def constant_baseline_loss(self, bucket: Bucket) -> float:
        """Velocity MSE of the best caption-blind constant prediction, E[x0] − E[ε] (per element)."""
        return float(1.0 + np.mean(np.var(self.patterns(bucket), axis=0)))
