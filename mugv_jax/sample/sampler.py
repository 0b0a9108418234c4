"""Rectified-flow Euler sampling with classifier-free guidance (the release's RFlow sampler).

Convention: x_t = (1 − t/1000)·x0 + (t/1000)·ε and the model predicts v = x0 − ε in its first
C_in output channels. The time grid t_i = (1 − i/N)·1000 is shifted by the resolution- and
length-dependent ratio r = sqrt(H·W/512²)·sqrt(T_latent) (H, W in pixels); the last Euler step
jumps from t_{N−1} to 0. Image-to-video: a per-frame mask m (1 = generate, 0 = keep clean) holds
conditioning frames at their clean latent and modulates them with t = 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TIMESTEPS = 1000
BASE_RESOLUTION = 512 * 512
# The release's negative prompt for classifier-free guidance (docs/reference.md §3.2).
NEGATIVE_PROMPT = (
    "ugly, blurry, lowres, bad anatomy, bad hands, text, error, missing fingers, "
    "extra digit, fewer digits, cropped, worst quality, low quality, normal quality, "
    "jpeg artifacts, signature, watermark, username, blurry"
)


def shift_ratio(height: int, width: int, num_latent_frames: int, *, round_to_bf16: bool = False) -> float:
    """r = sqrt(H·W/512²)·sqrt(T_latent). The release passes H, W, T as bf16 tensors, so its r is
    bf16-rounded (7.0 instead of 7.0156 at 720p/5 s); `round_to_bf16` reproduces that."""
    if round_to_bf16:
        bf = _bf16
        hw = (bf(height) * bf(width)).astype(jnp.bfloat16)
        ratio_space = np.sqrt((hw / bf(BASE_RESOLUTION)).astype(jnp.bfloat16)).astype(jnp.bfloat16)
        ratio_time = np.sqrt(bf(num_latent_frames)).astype(jnp.bfloat16)
        return float((ratio_space * ratio_time).astype(jnp.bfloat16))
    return float(np.sqrt(height * width / BASE_RESOLUTION) * np.sqrt(num_latent_frames))


def shift_timesteps(t: np.ndarray, ratio: float, *, round_to_bf16: bool = False) -> np.ndarray:
    """τ' = rτ / (1 + (r − 1)τ) on t ∈ [0, 1000], float32.

    `round_to_bf16`: the release's arithmetic with its bf16 ratio (`shift_ratio(...,
    round_to_bf16=True)`): `ratio − 1` is a bf16 tensor minus a Python number, so it is rounded to
    bf16 too, before the products promote to float32. Exact for r ≥ 0.5 (Sterbenz); below, r − 1
    loses r's low bits (toy sizes: r ≈ 0.1)."""
    tau = np.asarray(t, np.float32) / np.float32(NUM_TIMESTEPS)
    r = np.float32(ratio)
    r_minus_1 = r - np.float32(1)
    if round_to_bf16:
        r_minus_1 = np.float32((_bf16(ratio) - _bf16(1.0)).astype(jnp.bfloat16))
    return (r * tau / (np.float32(1) + r_minus_1 * tau) * np.float32(NUM_TIMESTEPS)).astype(np.float32)


def _bf16(v) -> np.ndarray:
    return np.asarray(v, np.float32).astype(jnp.bfloat16)


def sampling_timesteps(num_steps: int, ratio: float, *, round_to_bf16: bool = False) -> np.ndarray:
    """The shifted float32 time grid t'_0 = 1000 > … > t'_{N−1} (N values; the last step goes to
    0); `round_to_bf16`: the release's bf16 shift arithmetic (`shift_timesteps`)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    raw = np.array([(1.0 - i / num_steps) * NUM_TIMESTEPS for i in range(num_steps)], np.float32)
    return shift_timesteps(raw, ratio, round_to_bf16=round_to_bf16)


def null_caption_input(null_text, length: int, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The unconditional text input a model trained by mugv_jax/mugv_megatron knows: its null
    caption's first `length` rows with every row valid, exactly what the trainers put in place of
    a dropped caption (objective.drop_captions). null_text: [max_text_tokens, D].
    Returns y [batch, 1, length, D] float32 and mask [batch, length] int32 (all ones)."""
    null = np.asarray(null_text, np.float32)
    if null.ndim != 2:
        raise ValueError(f"null caption must be [max_text_tokens, text_dim], got {list(null.shape)}")
    if length > null.shape[0]:
        raise ValueError(
            f"caption length {length} exceeds the null caption's {null.shape[0]} rows (the model's max_text_tokens)"
        )
    y = np.broadcast_to(null[None, None, :length], (batch, 1, length, null.shape[1]))
    return np.ascontiguousarray(y), np.ones((batch, length), np.int32)


def _pad_text(y, mask, length):
    pad = length - y.shape[2]
    if pad:
        y = jnp.pad(y, ((0, 0), (0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    return y, mask


@functools.cache
def _jitted_guided_velocity(config, options, in_channels: int):
    """One compiled guided-velocity function per (model config, runtime options): every sampling
    call with the same model reuses it instead of re-tracing a fresh closure."""
    from mugv_jax.dit.model import forward

    @jax.jit
    def velocity(params, z, t, y, mask, x_mask, fps, frame_indice, scale):
        out = forward(
            params,
            config,
            options,
            jnp.concatenate([z, z]),
            jnp.concatenate([t, t]),
            y,
            mask,
            jnp.concatenate([x_mask, x_mask]),
            fps,
            frame_indice,
        )
        v_c, v_u = jnp.split(out[:, :in_channels], 2)
        return v_u + scale * (v_c - v_u)

    return velocity


def make_guided_velocity_from_params(params, config, options, *, in_channels: int | None = None):
    """Like make_guided_velocity, over a (possibly sharded) parameter pytree: the trainer samples
    from its EMA without gathering the weights to one host."""
    velocity = _jitted_guided_velocity(config, options, in_channels or config.in_channels)
    return lambda *args: velocity(params, *args)


def make_guided_velocity(model, *, in_channels: int | None = None):
    """A jitted v(z, t, y, mask, x_mask, fps, frame_indice, scale) with classifier-free guidance.

    y/mask hold [conditional; unconditional] along the batch; z and t are one batch each, run
    twice in one model call; returns v_u + s·(v_c − v_u) over the velocity channels.
    """
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return make_guided_velocity_from_params(params, model.config, model.options, in_channels=in_channels)


def sample(
    model,
    z,
    cond_y,
    cond_mask,
    neg_y,
    neg_mask,
    *,
    height: int,
    width: int,
    num_steps: int = 25,
    guidance_scale: float = 4.0,
    frame_mask=None,
    noise=None,
    key=None,
    fps=30.0,
    frame_indice=None,
    round_shift_to_bf16: bool = False,
    progress: bool = False,
    velocity_fn: Callable | None = None,
    shift: float | None = None,
):
    """Denoise latents z [B, C, T, h, w] from t = 1000 to 0.

    z: the starting latents; frames with frame_mask = 1 are replaced by noise at the first step,
    frames with 0 keep their clean values (the image-to-video reference latent).
    noise: ε for that first step (default: drawn from `key`). frame_mask: [B, T] in [0, 1]
    (default all ones = text-to-video). Fractional masks hold a frame clean until t ≤ m·1000 and
    then inject fresh noise, as the release's scheduler does.
    height, width: pixel size, used only for the timestep shift. shift: a fixed shift ratio that
    replaces the resolution/length rule (use the one the model was trained with).
    frame_indice: temporal RoPE positions, [1, T+2] for every sample or [B, T+2] per sample.
    round_shift_to_bf16: the release's bf16 shift (its ratio and `ratio − 1` rounded to bf16).
    """
    z = jnp.asarray(z, jnp.float32)
    b, _, t_lat = z.shape[:3]
    if key is None:
        key = jax.random.PRNGKey(0)
    if frame_mask is None:
        frame_mask = jnp.ones((b, t_lat), jnp.float32)
    frame_mask = jnp.asarray(frame_mask, jnp.float32)
    if frame_mask.shape != (b, t_lat):
        raise ValueError(f"frame_mask must be [B, T]=[{b}, {t_lat}], got {list(frame_mask.shape)}")
    if noise is None:
        key, sub = jax.random.split(key)
        noise = jax.random.normal(sub, z.shape, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != z.shape:
        raise ValueError(f"noise must have the latents' shape {list(z.shape)}, got {list(noise.shape)}")
    length = max(cond_y.shape[2], neg_y.shape[2])
    cond_y, cond_mask = _pad_text(jnp.asarray(cond_y), jnp.asarray(cond_mask), length)
    neg_y, neg_mask = _pad_text(jnp.asarray(neg_y), jnp.asarray(neg_mask), length)
    y = jnp.concatenate([cond_y, neg_y])
    mask = jnp.concatenate([cond_mask, neg_mask])
    fps = jnp.broadcast_to(jnp.asarray(fps, jnp.float32).reshape(-1), (2 * b,))
    if frame_indice is None:
        frame_indice = jnp.arange(t_lat + 2, dtype=jnp.int32)[None]
    frame_indice = jnp.asarray(frame_indice, jnp.int32)
    if frame_indice.ndim != 2 or frame_indice.shape[0] not in (1, b) or frame_indice.shape[1] != t_lat + 2:
        raise ValueError(
            f"frame_indice must be [1, T+2] or per sample [B, T+2] = [{b}, {t_lat + 2}], got {list(frame_indice.shape)}"
        )
    if frame_indice.shape[0] > 1:
        # Per-sample positions: the conditional and the unconditional half of the batch both take them.
        frame_indice = jnp.concatenate([frame_indice, frame_indice])
    velocity = velocity_fn or make_guided_velocity(model)

    bf16_shift = round_shift_to_bf16 and shift is None
    ratio = shift if shift is not None else shift_ratio(height, width, t_lat, round_to_bf16=bf16_shift)
    timesteps = sampling_timesteps(num_steps, ratio, round_to_bf16=bf16_shift)
    noise_added = jnp.zeros((b, t_lat), bool)
    steps = range(num_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sampling", unit="step")
    for i in steps:
        t = np.float32(timesteps[i])
        x0 = z
        frames_noisy = frame_mask * NUM_TIMESTEPS >= t  # [B, T]: frames denoised at this step
        if i == 0:
            eps = noise
        else:
            key, sub = jax.random.split(key)
            eps = jax.random.normal(sub, z.shape, jnp.float32)
        tau = t / np.float32(NUM_TIMESTEPS)
        x_noise = (np.float32(1) - tau) * x0 + tau * eps
        add_noise = frames_noisy & ~noise_added
        z = jnp.where(add_noise[:, None, :, None, None], x_noise, x0)
        noise_added = frames_noisy
        v = velocity(
            z, jnp.full((b,), t, jnp.float32), y, mask, frames_noisy, fps, frame_indice, jnp.float32(guidance_scale)
        )
        dt = (timesteps[i] - timesteps[i + 1]) if i + 1 < num_steps else timesteps[i]
        z = z + v * (np.float32(dt) / np.float32(NUM_TIMESTEPS))
        z = jnp.where(frames_noisy[:, None, :, None, None], z, x0)
    return z
