"""Scaled dot-product attention behind one function, so backends can be swapped by name.

Only the XLA reference implementation exists so far; fused (cuDNN, Pallas splash) and
context-parallel (ring, Ulysses) backends plug in here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _xla_attention(q, k, v, key_mask, precision):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
        # A sample with no valid key attends to nothing: zero output instead of NaN.
        any_valid = jnp.any(key_mask, axis=-1)[:, None, None, None]
        logits = jnp.where(any_valid, logits, 0.0)
    probs = jax.nn.softmax(logits, axis=-1)
    if key_mask is not None:
        probs = jnp.where(any_valid, probs, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


_BACKENDS = {"xla": _xla_attention}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          key_mask: jax.Array | None = None, implementation: str = "xla",
                          precision=None) -> jax.Array:
    """softmax(q·kᵀ/√d)·v over [batch, length, heads, head_dim] inputs.

    key_mask: [batch, kv_length] bool, True where a key may be attended to.
    """
    try:
        fn = _BACKENDS[implementation]
    except KeyError:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"available: {sorted(_BACKENDS)}") from None
    return fn(q, k, v, key_mask, precision)
