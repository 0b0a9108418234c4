"""Stateless numerical pieces of MUG-DiT: norms, activations, sinusoids, modulation, 3D RoPE.

Everything that the release computes in float32 (norm statistics, RoPE angles, sinusoids, the
modulation-table addition) is computed in float32 here whatever the compute dtype.

The norms, the GELU and the per-token selection have hand-written backward passes (custom VJPs)
that keep what a hand-written kernel keeps (the normalised input and 1/σ, the GELU's input, the
token mask) instead of every intermediate autodiff would keep. The forward is the same code; the
gradients agree with autodiff to float32 rounding (tests/mugv_jax/test_dit_ops.py). Under the scanned
blocks each kept intermediate is a stacked buffer written in the forward and read back in the
backward, so this is most of what `remat="none"` costs over torch autograd on a CPU
(bench/cpu_vs_torch.py, docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mugv.config import DiTConfig

F32 = jnp.float32


def _sum_to(g, shape):
    """g summed over its leading axes down to `shape` (a parameter's gradient), float32."""
    return jnp.sum(g.astype(F32), axis=tuple(range(g.ndim - len(shape)))).reshape(shape)


def row_dot(a, b):
    """Σ_d a[..., d]·b[..., d] in float32, as a contraction: XLA's CPU backend runs a sum of a
    product over a short last axis (the head dim, 72) ~10x slower than this dot (its own rewrite
    of the product-sum into a dot picks a slow path); exact float32 on every platform (HIGHEST)."""
    return jnp.einsum(
        "...d,...d->...", a.astype(F32), b.astype(F32), precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32
    )


def _normalised_grad(gxhat, xhat, rstd):
    """d/dx of xhat = (x − mean)·rstd (mean removed or not), given d/dxhat: one float32 pass."""
    return rstd * (gxhat - xhat * (row_dot(gxhat, xhat)[..., None] / xhat.shape[-1]))


def _layer_norm_fwd(x, scale, bias, eps, dtype):
    x32 = x.astype(F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (x32 - mean) * rstd
    y = xhat
    if scale is not None:
        y = y * scale.astype(F32)
    if bias is not None:
        y = y + bias.astype(F32)
    return y, (xhat, rstd, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, dtype):
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_bwd(eps, dtype, res, g):
    xhat, rstd, scale, bias = res
    g = g.astype(F32)
    gxhat = g if scale is None else g * scale.astype(F32)
    gxhat = gxhat - jnp.mean(gxhat, axis=-1, keepdims=True)
    dx = _normalised_grad(gxhat, xhat, rstd).astype(dtype)
    dscale = None if scale is None else _sum_to(g * xhat, scale.shape).astype(scale.dtype)
    dbias = None if bias is None else _sum_to(g, bias.shape).astype(bias.dtype)
    return dx, dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x, eps, scale=None, bias=None):
    """LayerNorm over the last axis in float32 (float32 result), optional affine."""
    return _layer_norm(x, scale, bias, eps, jnp.dtype(x.dtype))


def _rms_norm_fwd(x, scale, eps):
    # Release order: statistics in float32, cast back to the input dtype, then × weight.
    x32 = x.astype(F32)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    y = (x32 * rstd).astype(x.dtype)
    return y * scale.astype(x.dtype), (x, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, scale, eps):
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_bwd(eps, res, g):
    x, rstd, scale = res
    xhat = x.astype(F32) * rstd
    dscale = _sum_to(g * xhat.astype(x.dtype), scale.shape).astype(scale.dtype)
    gxhat = (g * scale.astype(x.dtype)).astype(F32)
    return _normalised_grad(gxhat, xhat, rstd).astype(x.dtype), dscale


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x, scale, eps):
    return _rms_norm(x, scale, eps)


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu(x):
    return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def gelu_tanh(x):
    return _gelu(x)


def _gelu_bwd(x, g):
    x32 = x.astype(F32)
    t = jnp.tanh(_GELU_C * (x32 + 0.044715 * x32**3))
    dt = _GELU_C * (1.0 + 3 * 0.044715 * x32 * x32)
    return ((g.astype(F32) * (0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * dt)).astype(x.dtype),)


gelu_tanh.defvjp(lambda x: (_gelu(x), x), _gelu_bwd)


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


def _select(token_mask, when_true, when_false):
    return jnp.where(token_mask[:, :, None], when_true[:, None, :], when_false[:, None, :])


@jax.custom_vjp
def select_per_token(token_mask, when_true, when_false):
    """Per-token choice between two per-sample vectors: [B,N] mask, [B,C] × 2 → [B,N,C]."""
    return _select(token_mask, when_true, when_false)


def _select_bwd(token_mask, g):
    # Keeps the [B, N] mask, not autodiff's [B, N, C] broadcast of it.
    zero = jnp.zeros_like(g)
    on = jnp.sum(jnp.where(token_mask[:, :, None], g, zero), axis=1)
    off = jnp.sum(jnp.where(token_mask[:, :, None], zero, g), axis=1)
    return jnp.zeros(token_mask.shape, jax.dtypes.float0), on, off


select_per_token.defvjp(lambda m, a, b: (_select(m, a, b), m), _select_bwd)


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
