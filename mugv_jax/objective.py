"""The rectified-flow training objective (spec.md §2).

t = sigmoid(u)·1000 with u ~ N(0, 1); shifted τ' = rτ/(1 + (r−1)τ) with
r = sqrt(H·W/512²)·sqrt(F) (H, W in pixels = latent × 8; F = latent frames, or a configured
constant — the reference hard-codes 10); x_t = (1−τ')·x0 + τ'·ε; target v = x0 − ε; the
prediction is output channels 0..C−1. Loss: squared error averaged per sample over its generated
frames, then over the batch. Conditioning (image-to-video) frames keep x0, are modulated with t=0
and do not count. Caption dropout replaces a whole caption with the null text features.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from mugv.training import BASE_RESOLUTION, ObjectiveConfig, shift_ratio  # noqa: F401 (re-exported)

def sample_logit_normal_t(key, batch: int) -> jax.Array:
    """t = sigmoid(u)·1000, u ~ N(0, 1)."""
    return jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32)) * 1000.0


def shift_t(t: jax.Array, ratio: float) -> jax.Array:
    tau = t / 1000.0
    return ratio * tau / (1.0 + (ratio - 1.0) * tau) * 1000.0


def noisy_latents(x0, eps, t):
    """x_t = (1 − t/1000)·x0 + (t/1000)·ε, t per sample."""
    tau = (t / 1000.0)[:, None, None, None, None]
    return (1.0 - tau) * x0 + tau * eps


def conditioning_frame_mask(key, batch: int, frames: int, config: ObjectiveConfig) -> jax.Array:
    """x_mask [B, T]: True = generated frame, False = conditioning frame (a prefix)."""
    k_apply, k_len = jax.random.split(key)
    apply = jax.random.uniform(k_apply, (batch,)) < config.i2v_prob
    if config.i2v_mode == "first":
        n_cond = jnp.ones((batch,), jnp.int32)
    else:
        n_cond = jax.random.randint(k_len, (batch,), 1, max(1, frames // 4) + 1)
    n_cond = jnp.where(apply, jnp.minimum(n_cond, frames - 1 if frames > 1 else 0), 0)
    return jnp.arange(frames)[None, :] >= n_cond[:, None]


def drop_captions(key, y, mask, null_text, prob: float):
    """Replace whole captions with the null features [L_max, D] (mask all valid) with prob `prob`."""
    b, _, length, _ = y.shape
    if length > null_text.shape[0]:
        raise ValueError(f"caption length {length} exceeds the model's max_text_tokens "
                         f"{null_text.shape[0]} (the null caption has that many rows)")
    drop = jax.random.uniform(key, (b,)) < prob
    null = jnp.broadcast_to(null_text[:length].astype(y.dtype), y.shape[1:])
    y = jnp.where(drop[:, None, None, None], null[None], y)
    mask = jnp.where(drop[:, None], jnp.ones_like(mask), mask)
    return y, mask, drop


def masked_frame_mse(pred, target, x_mask):
    """Per-sample mean squared error over generated frames, averaged over the batch.

    pred, target: [B, C, T, H, W]; x_mask: [B, T] (True = counts). Samples without any generated
    frame contribute 0. Returns (batch loss, per-sample loss)."""
    se = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 3, 4))
    w = x_mask.astype(jnp.float32)
    per_sample = jnp.sum(se * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return jnp.mean(per_sample), per_sample


def prepare(key, batch: dict, null_text, config: ObjectiveConfig):
    """Draw timesteps, noise, conditioning frames and caption dropout for one batch.

    Returns the model inputs, the velocity target and the per-sample raw t (for quartile metrics).
    """
    x0 = batch["latents"].astype(jnp.float32)
    b, _, frames, h, w = x0.shape
    k_t, k_eps, k_cond, k_drop = jax.random.split(key, 4)
    ratio = config.shift_ratio if config.shift_ratio is not None else \
        shift_ratio((frames, h, w), config.shift_num_frames)
    t = shift_t(sample_logit_normal_t(k_t, b), ratio)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    x_mask = conditioning_frame_mask(k_cond, b, frames, config)
    xt = noisy_latents(x0, eps, t)
    xt = jnp.where(x_mask[:, None, :, None, None], xt, x0)  # conditioning frames stay clean
    y, mask, _ = drop_captions(k_drop, batch["y"], batch["mask"], null_text, config.caption_dropout_prob)
    inputs = dict(x=xt, timestep=t, y=y, mask=mask, x_mask=x_mask, fps=batch["fps"],
                  frame_indice=batch.get("frame_indice"))
    return inputs, x0 - eps, t
