"""Building blocks of the VAE: convolutions, GroupNorm, Linear, in the release's tensor layout.

Parameters are stored exactly as the release stores them (PyTorch layout: conv weight
[C_out, C_in, *kernel], linear weight [out, in]) and named `weight`/`bias`, so that a module's
parameter path *is* its release state-dict name and loading/exporting needs no transposes.
Activations are channels-last ([N, (T,) H, W, C]); the convolution's dimension numbers bridge the
two layouts. Bridging costs a transpose of every kernel on every call (XLA has no other way to
feed a channels-last convolution from [C_out, C_in, ...] weights): over a third of a one-frame
2D call on a CPU. `spatial_kernels(module)` gives a copy whose kernels are laid out once as
[*kernel, C_in, C_out]; `JittedVAE` runs that copy (bench/cpu_vs_torch.py, docs/benchmarks.md).

On a CPU the copy also runs each 3D convolution as one 2D convolution per temporal tap, summed in
float32: XLA's CPU backend has a fast 2D convolution and a 3D one up to 2x slower (the same
arithmetic, added in another order). Not in training: three times the convolutions to compile,
forward and backward, costs more than it saves at the sizes anyone trains on a CPU.

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


TORCH_LAYOUT, SPATIAL_LAYOUT = "torch", "spatial"  # [C_out, C_in, *kernel] | [*kernel, C_in, C_out]


class ConvNd(nnx.Module):
    """A bias-optional convolution over channels-last activations, kernel in the release layout.

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
        self.kernel_layout = TORCH_LAYOUT
        self.conv3d_by_taps = False

    def _conv(self, x, w, stride=None, padding=None):
        """x [N, (T,) H, W, C]; w a kernel of as many spatial axes, in this module's layout."""
        spatial = "DHW"[-(x.ndim - 2) :]
        kernel = f"OI{spatial}" if self.kernel_layout == TORCH_LAYOUT else f"{spatial}IO"
        return jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=self.stride if stride is None else stride,
            padding=self.padding if padding is None else padding,
            dimension_numbers=(f"N{spatial}C", kernel, f"N{spatial}C"),
            precision=HIGHEST,
            preferred_element_type=F32,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if len(self.stride) == 3 and self.conv3d_by_taps:
            y = self._conv3d_by_taps(x, w)
        else:
            y = self._conv(x, w)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)

    def _conv3d_by_taps(self, x, w):
        """x [N, T, H, W, C]: Σ over temporal taps of a 2D convolution of the (strided) frames."""
        n, t, h, wd, c = x.shape
        (front, back), *space = self.padding
        st = self.stride[0]
        kt = w.shape[2] if self.kernel_layout == TORCH_LAYOUT else w.shape[0]
        t_out = (t + front + back - kt) // st + 1
        xp = jnp.pad(x, ((0, 0), (front, back), (0, 0), (0, 0), (0, 0)))
        y = None
        for dt in range(kt):
            frames = xp[:, dt : dt + st * (t_out - 1) + 1 : st].reshape(n * t_out, h, wd, c)
            tap = w[:, :, dt] if self.kernel_layout == TORCH_LAYOUT else w[dt]
            part = self._conv(frames, tap, self.stride[1:], space)
            y = part if y is None else y + part
        return y.reshape(n, t_out, *y.shape[1:])


def spatial_kernels(module: nnx.Module, conv3d_by_taps: bool = False) -> nnx.Module:
    """A copy of `module` whose convolutions hold their kernels as [*kernel, C_in, C_out] (the
    layout XLA convolves channels-last activations with), transposed once here instead of on every
    call, and with `conv3d_by_taps` run 3D convolutions tap by tap. Other parameters are shared
    with `module`, whose own kernels are left as they are; the copy's kernels are new arrays (the
    conv weights are held twice while both live)."""
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, state)
    for _, m in nnx.iter_modules(copy):
        if isinstance(m, ConvNd) and m.kernel_layout == TORCH_LAYOUT:
            nd = m.weight[...].ndim - 2
            perm = (*range(2, 2 + nd), 1, 0)
            axes = m.weight.get_metadata().get("logical_axes")
            m.weight = nnx.Param(
                jnp.transpose(m.weight[...], perm),
                logical_axes=None if axes is None else tuple(axes[i] for i in perm),
            )
            m.kernel_layout = SPATIAL_LAYOUT
        if isinstance(m, ConvNd):
            m.conv3d_by_taps = conv3d_by_taps
    return copy


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
        # Sums per channel over the positions (the channel axis stays minor: XLA's CPU reductions
        # are fast that way, and 2x slower over (positions, channels-in-group) at once), then per
        # group; the normalisation and affine fold into one per-channel scale and shift.
        shape, c = x.shape, x.shape[-1]
        per_group = c // self.groups
        x32 = x.astype(F32).reshape(shape[0], -1, c)
        count = x32.shape[1] * per_group

        def per_channel_group_mean(values):  # [N, C] sums → [N, C] mean of each channel's group
            return jnp.repeat(jnp.sum(values.reshape(shape[0], self.groups, per_group), axis=-1) / count, per_group, -1)

        mean = per_channel_group_mean(jnp.sum(x32, axis=1))
        centred = x32 - mean[:, None, :]
        var = per_channel_group_mean(jnp.sum(centred * centred, axis=1))  # biased, like torch
        scale = jax.lax.rsqrt(var + self.eps) * self.weight[...]
        shift = self.bias[...] - mean * scale
        return (x32 * scale[:, None, :] + shift[:, None, :]).reshape(shape).astype(self.dtype)


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
