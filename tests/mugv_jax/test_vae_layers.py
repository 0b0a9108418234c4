"""mugv_jax/vae/layers.py: convolutions in both kernel layouts and by temporal taps, GroupNorm."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mugv_jax.vae import layers

HIGHEST = jax.lax.Precision.HIGHEST
# float32, the same products summed in another order (measured ≤ 3e-6 relative to the max).
REL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tiny shapes: the compile is the cost


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _reference_conv(conv, x):
    """XLA's own N-d convolution of the release-layout kernel: what the layer must equal."""
    nd = len(conv.stride)
    spatial = "DHW"[-nd:]
    numbers = (f"N{spatial}C", f"OI{spatial}", f"N{spatial}C")
    y = jax.lax.conv_general_dilated(
        x, conv.weight[...], conv.stride, conv.padding, dimension_numbers=numbers, precision=HIGHEST
    )
    return y if conv.bias is None else y + conv.bias[...]


def test_spatial_kernels_and_conv3d_by_taps_equal_the_plain_convolution():
    rngs = nnx.Rngs(0)
    x3 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 6, 7, 8)), jnp.float32)
    x2 = x3[:, 0]
    convs = [
        (layers.CausalConv3d(8, 12, 3, bias=True, dtype=jnp.float32, rngs=rngs).conv, x3),
        (layers.CausalConv3d(8, 12, 3, bias=True, time_stride=2, dtype=jnp.float32, rngs=rngs).conv, x3),
        (layers.CausalConv3d(8, 4, 1, bias=False, dtype=jnp.float32, rngs=rngs).conv, x3),
        (layers.conv2d(8, 12, 3, stride=2, padding=(0, 1), dtype=jnp.float32, rngs=rngs), x2),
    ]
    for conv, x in convs:
        want = _reference_conv(conv, x)
        before = np.asarray(conv.weight[...])
        copy = layers.spatial_kernels(conv)
        by_taps = layers.spatial_kernels(conv, conv3d_by_taps=True)
        assert by_taps.conv3d_by_taps and not copy.conv3d_by_taps and not conv.conv3d_by_taps
        for module in (conv, copy, by_taps):
            got = jax.jit(lambda x: module(x), compiler_options=FAST_COMPILE)(x)
            assert got.shape == want.shape and _rel(got, want) <= REL
        # The copy holds [*kernel, C_in, C_out]; the original is left in the release layout.
        nd = before.ndim - 2
        np.testing.assert_array_equal(copy.weight[...], before.transpose(*range(2, 2 + nd), 1, 0))
        np.testing.assert_array_equal(conv.weight[...], before)
        assert conv.kernel_layout == layers.TORCH_LAYOUT and copy.kernel_layout == layers.SPATIAL_LAYOUT
        axes = copy.weight.get_metadata()["logical_axes"]
        assert axes[-2:] == (layers.CONV_IN, layers.CONV_OUT)


def test_group_norm_equals_the_two_pass_definition():
    """Statistics over (positions, channels of the group), biased variance, like torch; data with
    a large mean, where a one-pass E[x²] − E[x]² would lose digits."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 4, 3, 16)) * 0.5 + 20.0, jnp.float32)
    gn = layers.GroupNorm(4, 16, 1e-5, dtype=jnp.float32)
    gn.weight[...] = jnp.asarray(rng.standard_normal(16), jnp.float32)
    gn.bias[...] = jnp.asarray(rng.standard_normal(16), jnp.float32)
    xg = np.asarray(x, np.float64).reshape(2, -1, 4, 4)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * np.asarray(gn.weight[...]) + np.asarray(gn.bias[...])
    assert _rel(jax.jit(lambda x: gn(x), compiler_options=FAST_COMPILE)(x), want) <= REL
