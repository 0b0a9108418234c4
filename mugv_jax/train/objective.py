"""The rectified-flow training objective (docs/reference.md §2).

t = sigmoid(u)·1000 with u ~ N(0, 1); shifted τ' = rτ/(1 + (r−1)τ) with
r = sqrt(H·W/512²)·sqrt(F) (H, W in pixels = latent × 8; F = latent frames, or a configured
constant — the reference hard-codes 10); x_t = (1−τ')·x0 + τ'·ε; target v = x0 − ε; the
prediction is output channels 0..C−1. Loss: squared error averaged per sample over its generated
frames, then over the batch. Conditioning (image-to-video) frames keep x0, are modulated with t=0
and do not count. Caption dropout replaces a whole caption with the null text features.
The random numbers are mugv.rng's (one definition for every backend), keyed by (seed, step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mugv import rng as ref_rng
from mugv.training import ObjectiveConfig, shift_ratio
from mugv_jax.train import rng


def logit_normal_t(u) -> jax.Array:
    """t = sigmoid(u)·1000 for standard-normal u."""
    return jax.nn.sigmoid(u) * 1000.0


def shift_t(t: jax.Array, ratio: float) -> jax.Array:
    tau = t / 1000.0
    return ratio * tau / (1.0 + (ratio - 1.0) * tau) * 1000.0


def noisy_latents(x0, eps, t):
    """x_t = (1 − t/1000)·x0 + (t/1000)·ε, t per sample."""
    tau = (t / 1000.0)[:, None, None, None, None]
    return (1.0 - tau) * x0 + tau * eps


def draws(k, latent_shape: tuple[int, ...], config: ObjectiveConfig) -> dict:
    """The step's random numbers (mugv.rng's definition) for a global batch of latents
    [B, C, T, H, W] under key `k` = mugv_jax.train.rng.key(seed, step): u, eps, n_cond, drop."""
    b, frames = latent_shape[0], latent_shape[2]
    apply = rng.uniforms(k, ref_rng.TAG_I2V_APPLY, b) < jnp.float32(config.i2v_prob)
    if config.i2v_mode == "first":
        n_cond = jnp.ones((b,), jnp.int32)
    else:
        n_cond = 1 + rng.randints(k, ref_rng.TAG_I2V_FRAMES, b, max(1, frames // 4))
    n_cond = jnp.where(apply, jnp.minimum(n_cond, frames - 1 if frames > 1 else 0), 0)
    return {
        "u": rng.normals(k, ref_rng.TAG_T, b),
        "eps": rng.normals(k, ref_rng.TAG_NOISE, b, tuple(latent_shape[1:])),
        "n_cond": n_cond,
        "drop": rng.uniforms(k, ref_rng.TAG_CAPTION_DROP, b) < jnp.float32(config.caption_dropout_prob),
    }


def drop_captions(y, mask, null_text, drop):
    """Replace the captions where `drop` [B] is set by the null features [L_max, D] (mask all valid)."""
    length = y.shape[2]
    if length > null_text.shape[0]:
        raise ValueError(
            f"caption length {length} exceeds the model's max_text_tokens "
            f"{null_text.shape[0]} (the null caption has that many rows)"
        )
    null = jnp.broadcast_to(null_text[:length].astype(y.dtype), y.shape[1:])
    y = jnp.where(drop[:, None, None, None], null[None], y)
    mask = jnp.where(drop[:, None], jnp.ones_like(mask), mask)
    return y, mask


def masked_frame_mse(pred, target, x_mask):
    """Per-sample mean squared error over generated frames, averaged over the batch.

    pred, target: [B, C, T, H, W]; x_mask: [B, T] (True = counts). Samples without any generated
    frame contribute 0. Returns (batch loss, per-sample loss)."""
    se = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 3, 4))
    w = x_mask.astype(jnp.float32)
    per_sample = jnp.sum(se * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return jnp.mean(per_sample), per_sample


def inputs_from_draws(batch: dict, null_text, config: ObjectiveConfig, d: dict):
    """Model inputs, velocity target and raw per-sample t of a batch under the draws `d`."""
    x0 = batch["latents"].astype(jnp.float32)
    frames, h, w = x0.shape[2:]
    ratio = (
        config.shift_ratio if config.shift_ratio is not None else shift_ratio((frames, h, w), config.shift_num_frames)
    )
    t = shift_t(logit_normal_t(d["u"]), ratio)
    eps = d["eps"]
    x_mask = jnp.arange(frames)[None, :] >= jnp.asarray(d["n_cond"])[:, None]
    xt = jnp.where(x_mask[:, None, :, None, None], noisy_latents(x0, eps, t), x0)  # conditioning frames stay clean
    y, mask = drop_captions(batch["y"], batch["mask"], null_text, jnp.asarray(d["drop"]))
    inputs = dict(
        x=xt, timestep=t, y=y, mask=mask, x_mask=x_mask, fps=batch["fps"], frame_indice=batch.get("frame_indice")
    )
    return inputs, x0 - eps, t


def prepare(k, batch: dict, null_text, config: ObjectiveConfig):
    """Draw (mugv.rng, key `k` = mugv_jax.train.rng.key(seed, step)) and build one batch's model inputs.

    Returns the model inputs, the velocity target and the per-sample raw t (for quartile metrics).
    """
    return inputs_from_draws(batch, null_text, config, draws(k, batch["latents"].shape, config))
