"""The hand-written backward passes of mugv_jax/dit/ops.py against autodiff of the plain formulas.

Forward values must be identical (the forward is the same code); gradients agree to rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mugv_jax.dit import ops

F32 = jnp.float32
# float32: the same derivative summed in another order (measured ≤ 1e-6 relative to each max).
F32_REL = 1e-5
# bfloat16 inputs: autodiff rounds some sums to bf16 where the custom backward keeps float32.
BF16_REL = 2e-2


def _layer_norm(x, eps, scale=None, bias=None):
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)
    y = y if scale is None else y * scale.astype(F32)
    return y if bias is None else y + bias.astype(F32)


def _rms_norm(x, scale, eps):
    y = x.astype(F32) * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(F32)), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def _select(m, a, b):
    return jnp.where(m[:, :, None], a[:, None, :], b[:, None, :])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options={"xla_backend_optimization_level": 0})
def _value_and_vjp(fn, argnums, args, g):
    out, vjp = jax.vjp(lambda *d: fn(*[d[argnums.index(i)] if i in argnums else a for i, a in enumerate(args)]),
                       *[args[i] for i in argnums])  # fmt: skip
    return out, vjp(g)


def _check(ours, plain, args, argnums, bound, exact_forward=True):
    rng = np.random.default_rng(3)
    out_shape = jax.eval_shape(plain, *args)
    g = jnp.asarray(rng.standard_normal(out_shape.shape), out_shape.dtype)
    out, grads = _value_and_vjp(ours, argnums, args, g)
    want, want_grads = _value_and_vjp(plain, argnums, args, g)
    if exact_forward:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    for got, ref in zip(grads, want_grads):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert _rel(got, ref) <= bound, (ours, _rel(got, ref))


def test_norms_gelu_and_selection_backward_match_autodiff():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 40)) * 3 + 1, F32)
    scale, bias = (jnp.asarray(rng.standard_normal(40), F32) for _ in range(2))
    heads = jnp.asarray(rng.standard_normal((2, 7, 3, 12)), F32)
    head_scale = jnp.asarray(rng.standard_normal(12), F32)
    mask = jnp.asarray(rng.random((2, 7)) < 0.5)
    a, b = (jnp.asarray(rng.standard_normal((2, 40)), F32) for _ in range(2))
    for dtype, bound in ((F32, F32_REL), (jnp.bfloat16, BF16_REL)):
        xd, hd = x.astype(dtype), heads.astype(dtype)
        ln = lambda f: lambda v, s, b: f(v, 1e-6, s, b)
        _check(lambda v: ops.layer_norm(v, 1e-6), lambda v: _layer_norm(v, 1e-6), (xd,), (0,), bound)
        _check(ln(ops.layer_norm), ln(_layer_norm), (xd, scale, bias), (0, 1, 2), bound)
        rms = lambda f: lambda v, s: f(v, s, 1e-6)
        _check(rms(ops.rms_norm), rms(_rms_norm), (hd, head_scale), (0, 1), bound)
        _check(ops.gelu_tanh, lambda v: jax.nn.gelu(v, approximate=True), (xd,), (0,), bound)
    _check(ops.select_per_token, _select, (mask, a, b), (1, 2), F32_REL)
