"""Building blocks of the VAE: convolutions, GroupNorm, Linear, in the release's tensor layout.

Parameters are stored exactly as the release stores them (PyTorch layout: conv weight
[C_out, C_in, *kernel], linear weight [out, in]) and named `weight`/`bias`, so that a module's
parameter path *is* its release state-dict name and loading/exporting needs no transposes.
Activations are channels-last ([N, (T,) H, W, C]); the convolution's dimension numbers bridge the
two layouts.

Numerics: parameters are float32 and cast to the compute dtype per op. Convolutions and matmuls
run at HIGHEST precision with float32 accumulation (accelerators would otherwise round inputs to
bf16 and miss the 1e-4 float32 parity). GroupNorm statistics are always float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST

# Logical axis names (mugv_jax.parallel.sharding maps them to mesh axes).
CONV_OUT = "conv_out"
CONV_IN = "conv_in"


class Buffer(nnx.Variable):
    """A persistent non-trainable tensor of the checkpoint (the latent `shift`/`scale`)."""


def _normal_param(rngs: nnx.Rngs, shape, fan_in: int, axes) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, F32) / math.sqrt(fan_in)
    return nnx.Param(value, logical_axes=tuple(axes))


def _const_param(value: float, shape, axes) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, F32), logical_axes=tuple(axes))


class ConvNd(nnx.Module):
    """A bias-optional convolution with a PyTorch-layout kernel over channels-last activations.

    `padding` is per spatial axis (front, back) zero padding; the release pads with zeros
    explicitly (F.pad) and then runs an unpadded conv, which is the same thing.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, ...],
        *,
        stride: tuple[int, ...],
        padding: tuple[tuple[int, int], ...],
        bias: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        nd = len(kernel)
        self.weight = _normal_param(
            rngs, (cout, cin, *kernel), cin * math.prod(kernel), (CONV_OUT, CONV_IN) + (None,) * nd
        )
        self.bias = _const_param(0.0, (cout,), (CONV_OUT,)) if bias else None
        self.stride = tuple(stride)
        self.padding = tuple(tuple(p) for p in padding)
        self.dtype = dtype
        spatial = "DHW"[-nd:]
        self.dimension_numbers = (f"N{spatial}C", f"OI{spatial}", f"N{spatial}C")

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.weight[...].astype(self.dtype),
            window_strides=self.stride,
            padding=self.padding,
            dimension_numbers=self.dimension_numbers,
            precision=HIGHEST,
            preferred_element_type=F32,
        )
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


def conv2d(cin, cout, k, *, dtype, rngs, stride=1, padding=None, bias=True) -> ConvNd:
    pad = (k // 2, k // 2) if padding is None else padding
    return ConvNd(cin, cout, (k, k), stride=(stride, stride), padding=(pad, pad), bias=bias, dtype=dtype, rngs=rngs)


class CausalConv3d(nnx.Module):
    """The release's `CausalConv3d`: despite the name, *centre*-padded in time.

    time_pad = (k_t − 1) + (1 − s_t), split front = time_pad // 2, back = the rest: (1, 1) for a
    3-tap stride-1 conv, (0, 1) for the stride-2 downsample. Space is padded k//2 on each side.
    The conv lives in a child named `conv` so the parameter path matches `*.conv.weight`.
    """

    def __init__(self, cin: int, cout: int, k: int, *, bias: bool, dtype, rngs: nnx.Rngs, time_stride: int = 1):
        time_pad = (k - 1) + (1 - time_stride)
        front = time_pad // 2
        self.conv = ConvNd(
            cin,
            cout,
            (k, k, k),
            stride=(time_stride, 1, 1),
            padding=((front, time_pad - front), (k // 2, k // 2), (k // 2, k // 2)),
            bias=bias,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on channels-last input: statistics over (C/G, every other axis) per sample."""

    def __init__(self, groups: int, channels: int, eps: float, *, dtype):
        self.weight = _const_param(1.0, (channels,), (CONV_OUT,))
        self.bias = _const_param(0.0, (channels,), (CONV_OUT,))
        self.groups = groups
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        xg = x.astype(F32).reshape(shape[0], -1, self.groups, shape[-1] // self.groups)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        centred = xg - mean
        var = jnp.mean(centred * centred, axis=(1, 3), keepdims=True)  # biased, like torch
        y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


class Linear(nnx.Module):
    """torch.nn.Linear: weight [out, in]."""

    def __init__(self, cin: int, cout: int, *, axes: tuple[str, str], dtype, rngs: nnx.Rngs):
        out_axis, in_axis = axes
        self.weight = _normal_param(rngs, (cout, cin), cin, (out_axis, in_axis))
        self.bias = _const_param(0.0, (cout,), (out_axis,))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(
            "...i,oi->...o",
            x.astype(self.dtype),
            self.weight[...].astype(self.dtype),
            precision=HIGHEST,
            preferred_element_type=F32,
        )
        return (y + self.bias[...]).astype(self.dtype)


def silu(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x)
