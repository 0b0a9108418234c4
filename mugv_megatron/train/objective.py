"""The rectified-flow training objective (docs/reference.md §2) in torch, for the Megatron trainer.

The same objective as `mugv_jax/train/objective.py`: t = sigmoid(u)·1000 with u ~ N(0, 1), shifted
τ' = rτ/(1 + (r−1)τ); x_t = (1−τ')·x0 + τ'·ε; target v = x0 − ε; the prediction is output
channels 0..C−1; per-sample squared error over generated frames, averaged over the batch.
Conditioning (image-to-video) frames keep x0, are modulated with t=0 and do not count; caption
dropout replaces a whole caption with the null text features.

Randomness is separated from the math: `prepare` turns a batch plus its `Draws` into model
inputs. The trainer's own draws are mugv.rng's (the JAX trainer's too): sample i of the global
batch at step s gets u, ε, its conditioning-frame count and its caption drop from Threefry-2x32
of (seed, s, i), computed on the training device (mugv_megatron/train/rng.py). So a rank draws only its
own rows (`SampleStreams`, one micro-batch at a time), and the value of a row does not depend on
which rank draws it, on the DP size, on gradient accumulation or on TP/CP/PP; a resumed run
redraws exactly the same numbers, and CPU and GPU runs draw the same numbers. `draw` makes a
global draw from one numpy generator instead: what some parity tests feed to both backends
(`Trainer.train_step(draws=...)`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mugv import rng as ref_rng
from mugv.training import ObjectiveConfig, shift_ratio
from mugv_megatron.train import rng


@dataclasses.dataclass(frozen=True)
class Draws:
    """The random numbers of one step for a run of rows (numpy arrays or torch tensors)."""

    u: np.ndarray  # [B] standard normal; t = sigmoid(u)·1000 before the shift
    eps: np.ndarray  # [B, C, T, H, W] standard normal noise
    n_cond: np.ndarray  # [B] conditioning (clean) frames at the start of each sample
    drop: np.ndarray  # [B] bool: caption replaced by the null text

    def slice(self, start: int, stop: int) -> Draws:
        return Draws(self.u[start:stop], self.eps[start:stop], self.n_cond[start:stop], self.drop[start:stop])


def draw(rng: np.random.Generator, latent_shape: tuple[int, ...], config: ObjectiveConfig) -> Draws:
    """Every random number of a step for a global batch of latents [B, C, T, H, W]."""
    b, _, frames = latent_shape[:3]
    u = rng.standard_normal(b, dtype=np.float32)
    eps = rng.standard_normal(tuple(latent_shape), dtype=np.float32)
    apply = rng.random(b) < config.i2v_prob
    if config.i2v_mode == "first":
        n_cond = np.ones(b, np.int64)
    else:
        n_cond = rng.integers(1, max(1, frames // 4) + 1, size=b)
    n_cond = np.where(apply, np.minimum(n_cond, frames - 1 if frames > 1 else 0), 0)
    drop = rng.random(b) < config.caption_dropout_prob
    return Draws(u, eps, n_cond.astype(np.int64), drop)


def draw_samples(
    seed: int,
    step: int,
    indices,
    sample_shape: tuple[int, ...],
    config: ObjectiveConfig,
    device: torch.device | str = "cpu",
) -> Draws:
    """The draws of global samples `indices` at `step` (torch tensors on `device`): mugv.rng's
    pretraining draws (u, ε [C, T, H, W], conditioning-frame count, caption drop), the same
    numbers the JAX trainer draws for those samples."""
    rows = torch.as_tensor(list(indices), dtype=torch.int64, device=torch.device(device))
    frames = int(sample_shape[1])
    apply = rng.uniforms(seed, step, ref_rng.TAG_I2V_APPLY, rows) < config.i2v_prob
    if config.i2v_mode == "first":
        n_cond = torch.ones(len(rows), dtype=torch.int64, device=rows.device)
    else:
        n_cond = 1 + rng.randints(seed, step, ref_rng.TAG_I2V_FRAMES, rows, max(1, frames // 4))
    n_cond = torch.where(apply, n_cond.clamp(max=frames - 1 if frames > 1 else 0), torch.zeros_like(n_cond))
    return Draws(
        rng.normals(seed, step, ref_rng.TAG_T, rows, ()),
        rng.normals(seed, step, ref_rng.TAG_NOISE, rows, tuple(sample_shape)),
        n_cond,
        rng.uniforms(seed, step, ref_rng.TAG_CAPTION_DROP, rows) < config.caption_dropout_prob,
    )


@dataclasses.dataclass(frozen=True)
class SampleStreams:
    """The draws of global rows [start, stop) at one step, made on demand: `slice(a, b)` draws
    local rows a..b-1 only (one micro-batch), so a rank never holds the noise of the others."""

    seed: int
    step: int
    start: int
    stop: int
    sample_shape: tuple[int, ...]
    config: ObjectiveConfig
    device: str = "cpu"

    def __len__(self) -> int:
        return self.stop - self.start

    def slice(self, start: int, stop: int) -> Draws:
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"rows [{start}, {stop}) outside the {len(self)} drawn rows")
        return draw_samples(
            self.seed,
            self.step,
            range(self.start + start, self.start + stop),
            self.sample_shape,
            self.config,
            self.device,
        )

    def materialize(self) -> Draws:
        return self.slice(0, len(self))


def shift_t(t: torch.Tensor, ratio: float) -> torch.Tensor:
    tau = t / 1000.0
    return ratio * tau / (1.0 + (ratio - 1.0) * tau) * 1000.0


def timesteps(u: torch.Tensor, latent_shape: tuple[int, int, int], config: ObjectiveConfig) -> torch.Tensor:
    ratio = config.shift_ratio if config.shift_ratio is not None else shift_ratio(latent_shape, config.shift_num_frames)
    return shift_t(torch.sigmoid(u) * 1000.0, ratio)


def noisy_latents(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tau = (t / 1000.0)[:, None, None, None, None]
    return (1.0 - tau) * x0 + tau * eps


def masked_frame_mse(pred: torch.Tensor, target: torch.Tensor, x_mask: torch.Tensor):
    """(batch loss, per-sample loss): squared error per sample over its generated frames
    (x_mask [B, T], True = counts), averaged over the batch; a sample without one gives 0."""
    se = (pred.float() - target.float()).square().mean(dim=(1, 3, 4))
    w = x_mask.float()
    per_sample = (se * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    return per_sample.mean(), per_sample


def prepare(
    batch: dict, null_text: torch.Tensor, config: ObjectiveConfig, draws: Draws, device: torch.device | str = "cpu"
):
    """Model inputs, velocity target and raw per-sample t for a batch and its draws.

    batch: latents [B, C, T, H, W], y [B, 1, L, D], mask [B, L], fps [B] (numpy or torch),
    optionally frame_indice [B, T+2]. null_text: [max_text_tokens, D]."""
    # np.array copies: numpy views of JAX/read-only buffers cannot back a torch tensor.
    as_t = lambda v: torch.as_tensor(v if torch.is_tensor(v) else np.array(v), device=device)  # noqa: E731
    x0 = as_t(batch["latents"]).float()
    b, _, frames, h, w = x0.shape
    if draws.eps.shape != tuple(x0.shape):
        raise ValueError(f"draws are for latents {list(draws.eps.shape)}, batch has {list(x0.shape)}")
    t = timesteps(as_t(draws.u).float(), (frames, h, w), config)
    eps = as_t(draws.eps).float()
    x_mask = torch.arange(frames, device=device)[None, :] >= as_t(draws.n_cond)[:, None]
    xt = noisy_latents(x0, eps, t)
    xt = torch.where(x_mask[:, None, :, None, None], xt, x0)  # conditioning frames stay clean
    y, mask = as_t(batch["y"]).float(), as_t(batch["mask"])
    length = y.shape[2]
    if length > null_text.shape[0]:
        raise ValueError(
            f"caption length {length} exceeds the model's max_text_tokens "
            f"{null_text.shape[0]} (the null caption has that many rows)"
        )
    drop = as_t(draws.drop).bool()
    null = null_text[:length].to(device=device, dtype=y.dtype).expand(y.shape[1:])
    y = torch.where(drop[:, None, None, None], null[None], y)
    mask = torch.where(drop[:, None], torch.ones_like(mask), mask)
    inputs = dict(
        x=xt,
        timestep=t,
        y=y,
        mask=mask,
        x_mask=x_mask,
        fps=as_t(batch["fps"]).float(),
        frame_indice=None if batch.get("frame_indice") is None else as_t(batch["frame_indice"]),
    )
    return inputs, x0 - eps, t
