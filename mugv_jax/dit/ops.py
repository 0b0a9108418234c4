"""Stateless numerical pieces of MUG-DiT: norms, activations, sinusoids, modulation, 3D RoPE.

Everything that the release computes in float32 (norm statistics, RoPE angles, sinusoids, the
modulation-table addition) is computed in float32 here whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mugv.config import DiTConfig

F32 = jnp.float32


def layer_norm(x, eps, scale=None, bias=None):
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(F32)
    if bias is not None:
        y = y + bias.astype(F32)
    return y


def rms_norm(x, scale, eps):
    # Release order: statistics in float32, cast back to the input dtype, then × weight.
    y = x.astype(F32) * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(F32)), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def modulate(x_normed, shift, scale):
    return x_normed * (1.0 + scale) + shift


def sinusoidal_embedding(t, dim: int, max_period: float = 10000.0):
    """[cos | sin] features of a raw scalar (no division by 1000), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=F32) / half)
    args = t.astype(F32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def select_per_token(token_mask, when_true, when_false):
    """Per-token choice between two per-sample vectors: [B,N] mask, [B,C] × 2 → [B,N,C]."""
    return jnp.where(token_mask[:, :, None], when_true[:, None, :], when_false[:, None, :])


# --- 3D RoPE -------------------------------------------------------------------------------------


def rope_frequencies(config: DiTConfig) -> np.ndarray:
    """Per-axis inverse frequencies θ^(−6j/head_dim), j < head_dim/6 (12 for head dim 72)."""
    d = config.head_dim
    exponents = np.arange(0, d, 6, dtype=np.float32)[: config.rope_pairs_per_axis] / np.float32(d)
    return (1.0 / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)


def rope_positions(frame_indice, grid: tuple[int, int, int], config: DiTConfig):
    """(h, w, t) positions [B, N+2, 3] for [start, video tokens in (t,h,w) order, end].

    Video frame i sits at temporal position frame_indice[:, i+1]; the start token at
    (0, 0, frame_indice[:, 0]) and the end token at (H'−1, W'−1, frame_indice[:, T'+1]).
    """
    gt, gh, gw = grid
    b = frame_indice.shape[0]
    fi = frame_indice.astype(jnp.int32)
    t_pos = jnp.broadcast_to(fi[:, 1 : gt + 1, None, None], (b, gt, gh, gw))
    h_pos = jnp.broadcast_to(jnp.arange(gh, dtype=jnp.int32)[None, None, :, None], (b, gt, gh, gw))
    w_pos = jnp.broadcast_to(jnp.arange(gw, dtype=jnp.int32)[None, None, None, :], (b, gt, gh, gw))
    video = jnp.stack([h_pos, w_pos, t_pos], axis=-1).reshape(b, gt * gh * gw, 3)
    start = jnp.stack([jnp.zeros_like(fi[:, 0]), jnp.zeros_like(fi[:, 0]), fi[:, 0]], -1)[:, None]
    end = jnp.stack([jnp.full_like(fi[:, 0], gh - 1), jnp.full_like(fi[:, 0], gw - 1), fi[:, gt + 1]], -1)[:, None]
    pos = jnp.concatenate([start, video, end], axis=1)
    limits = jnp.array(
        [config.rope_space_positions - 1, config.rope_space_positions - 1, config.rope_time_positions - 1],
        dtype=jnp.int32,
    )
    return jnp.clip(pos, 0, limits)


def rope_angles(positions, config: DiTConfig):
    """Rotation angles [B, N, head_dim/2] ordered [h pairs | w pairs | t pairs], float32."""
    freqs = jnp.asarray(rope_frequencies(config))
    ang = positions.astype(F32)[..., None] * freqs  # [B, N, 3, pairs]
    return ang.reshape(*positions.shape[:2], -1)


def rope_cos_sin(angles):
    """cos/sin tables [B, N, 1, D/2], computed once per forward and shared by every layer."""
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (2j, 2j+1) of x [B,N,H,D] by the tables' angles, in float32."""
    xf = x.astype(F32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
