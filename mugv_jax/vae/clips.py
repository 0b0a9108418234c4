"""The VAE trainer's data: training clips (given, procedural or read from videos), the held-out
split, random crops and the step-indexed iterator the run loop checkpoints.

Held out: whole clips (`data.holdout_clips`, spread over the list; they never reach training), else
the last `data.holdout_fraction` of every clip's frames, which training never samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from mugv.vae_config import TEMPORAL_GROUP
from mugv_jax.vae.videos import list_videos, procedural_clips, read_videos, to_unit
from mugv_jax.vae.windows import first_frame_copies

log = logging.getLogger(__name__)


def load_clips(config, clips: Iterable[np.ndarray] | None) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """uint8 clips [T, H, W, 3] and the (file, reason) of every video that could not be read."""
    failures: list[tuple[str, str]] = []
    if clips is not None:
        out = [np.asarray(c) for c in clips]
    elif config.data.videos == "builtin:procedural":
        n = max(8, config.data.eval_clips * 2)
        out = procedural_clips(n, frames=max(2 * config.frames, 32), size=max(config.size) * 2, seed=config.seed)
    else:
        paths = list_videos(config.data.videos)
        out = [
            f
            for _, f, _ in read_videos(
                paths, failures, max_frames=config.data.max_frames, short_side=config.data.short_side
            )
        ]
        for path, reason in failures:
            log.warning("skipped unreadable video %s: %s", path, reason)
    for i, c in enumerate(out):
        if c.ndim != 4 or c.shape[-1] != 3 or c.dtype != np.uint8:
            raise ValueError(f"training clip {i} must be uint8 [T, H, W, 3], got {c.dtype} {c.shape}")
    if not out:
        raise ValueError(f"no training clips from {config.data.videos!r} ({len(failures)} unreadable: {failures[:3]})")
    return out, failures


def first_frame_padded(clip: np.ndarray) -> np.ndarray:
    """A clip of 8k+1 frames with 7 copies of frame 0 in front: what the encode pipeline feeds
    the temporal encoder in chunked mode (the first-frame rule, mugv_jax/vae/windows.py). The 2D
    encoder works per frame, so repeating pixels equals repeating features."""
    copies = first_frame_copies(clip.shape[0])
    return np.concatenate([np.repeat(clip[:1], copies, axis=0), clip]) if copies else clip


def holdout_indices(num_clips: int, count: int) -> list[int]:
    """`count` clip indices spread evenly over the list (the first and last included)."""
    if count <= 0:
        return []
    if count >= num_clips:
        raise ValueError(f"config.data.holdout_clips={count} leaves no training clip of {num_clips}")
    return sorted({int(round(i)) for i in np.linspace(0, num_clips - 1, count)})


class CropSampler:
    """Random (frames, H, W) crops from the training clips; fixed held-out crops.

    Held out: whole clips (`holdout_clips` of them, spread over the list; they never reach
    training), else the last `holdout` fraction of every clip's frames. `first_frame=True` pads
    8k+1-frame clips with the pipeline's first-frame rule first, so a 17-frame clip trains (and
    evaluates) as the 24 frames, three latents, that encoding it produces.
    """

    def __init__(
        self,
        clips: list[np.ndarray],
        frames: int,
        size: tuple[int, int],
        holdout: float,
        holdout_clips: int = 0,
        first_frame: bool = False,
    ):
        h, w = size
        self.frames, self.size = frames, (h, w)
        self.train, self.held = [], []
        held_out = set(holdout_indices(len(clips), holdout_clips))
        self.whole_clips_held = bool(held_out)
        for i, c in enumerate(clips):
            t, ch, cw = c.shape[:3]
            if ch < h or cw < w:
                raise ValueError(f"training clip {i} is {ch}×{cw} px, smaller than config.size={size}")
            if first_frame:
                c = first_frame_padded(c)
                t = c.shape[0]
            if i in held_out:
                if t >= frames:
                    self.held.append(c)
                continue
            n_held = 0 if held_out else int(round(t * holdout))
            if holdout > 0 and not held_out and t - n_held >= frames and n_held >= frames:
                self.train.append(c[: t - n_held])
                self.held.append(c[t - n_held :])
            elif t >= frames:
                self.train.append(c)
        if not self.train:
            raise ValueError(
                f"no clip has {frames} frames for training (clip lengths "
                f"{[c.shape[0] for c in clips]}{', first-frame padded' if first_frame else ''})"
            )
        if held_out and not self.held:
            raise ValueError(f"no held-out clip has {frames} frames (config.data.holdout_clips={holdout_clips})")

    def batch(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        out = []
        for _ in range(batch_size):
            c = self.train[rng.integers(len(self.train))]
            t0 = rng.integers(c.shape[0] - self.frames + 1)
            y0 = rng.integers(c.shape[1] - self.size[0] + 1)
            x0 = rng.integers(c.shape[2] - self.size[1] + 1)
            crop = c[t0 : t0 + self.frames, y0 : y0 + self.size[0], x0 : x0 + self.size[1]]
            out.append(crop[:, :, ::-1] if rng.random() < 0.5 else crop)
        return to_unit(np.stack(out))

    def eval_set(self, count: int) -> np.ndarray | None:
        """Centre crops of the held-out frames. Whole clips held out: every `frames`-long window of
        the first `count` held clips, in steps of `frames` from the start (with the first-frame
        rule the first window is [f0 ×8], a still image: one window per clip would measure only
        those). Otherwise `count` windows, cycling through the held parts."""
        if not self.held:
            return None
        if self.whole_clips_held:
            windows = [(c, t0) for c in self.held[:count] for t0 in range(0, c.shape[0] - self.frames + 1, self.frames)]
        else:
            windows = []
            for i in range(count):
                c = self.held[i % len(self.held)]
                windows.append((c, (i // len(self.held)) * self.frames % (c.shape[0] - self.frames + 1)))
        out = []
        for c, t0 in windows:
            y0 = (c.shape[1] - self.size[0]) // 2
            x0 = (c.shape[2] - self.size[1]) // 2
            out.append(c[t0 : t0 + self.frames, y0 : y0 + self.size[0], x0 : x0 + self.size[1]])
        return to_unit(np.stack(out))


def decode_window_sizes(config) -> list[int]:
    """Decode window sizes (latents) usable for this clip length: those dividing frames/8."""
    k = config.frames // TEMPORAL_GROUP
    ok = sorted({n for n in config.decoder_windows if k % n == 0})
    return ok or [k]


class CropIterator:
    """Step s's training batch — random crops and a decode window drawn from (seed, s) — so the
    position is just the step and a resumed run sees the same batches."""

    def __init__(self, config, sampler: CropSampler):
        self.config, self.sampler, self.step = config, sampler, 0
        self.windows = decode_window_sizes(config)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.config.seed, self.step])
        x = self.sampler.batch(rng, self.config.batch_size)
        window = self.windows[rng.integers(len(self.windows))]
        self.step += 1
        return {"x": x, "window": int(window)}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
