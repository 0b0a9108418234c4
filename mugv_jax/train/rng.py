"""The step draws of `mugv.rng` in jax.numpy, traceable under `jax.jit`.

The integer function is the same Threefry-2x32 as the numpy reference, so bits agree exactly; the
counters are built from iotas over the *global* batch, so under a sharded jit each device computes
only the rows it holds (the partitioner splits elementwise work like any other)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mugv import rng as ref


def threefry2x32(key, c0, c1):
    """key: uint32 [2] (traced or static), counters uint32 arrays of one shape."""
    k0, k1 = key[0], key[1]
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(ref.KEY_PARITY))
    x0, x1 = c0 + ks[0], c1 + ks[1]
    for group in range(5):
        for r in ref.ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def key(seed, step):
    return jnp.stack([jnp.asarray(seed).astype(jnp.uint32), jnp.asarray(step).astype(jnp.uint32)])


def bits(k, tag: int, batch: int, shape: tuple[int, ...]):
    """Output words [batch, *shape] for global rows 0..batch−1."""
    if batch > ref.MAX_ROWS:
        raise ValueError(f"global batch {batch} exceeds the {ref.MAX_ROWS} rows a step can draw for")
    n = int(np.prod(shape)) if shape else 1
    rows = jnp.arange(batch, dtype=jnp.uint32).reshape((batch,) + (1,) * len(shape))
    elements = jnp.arange(n, dtype=jnp.uint32).reshape((1,) + tuple(shape))
    c0 = jnp.broadcast_to((jnp.uint32(tag) << jnp.uint32(ref.ROW_BITS)) | rows, (batch, *shape))
    c1 = jnp.broadcast_to(elements, (batch, *shape))
    return threefry2x32(k, c0, c1)


def uniform(x):
    return ((x >> jnp.uint32(9)).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-23)


def normals(k, tag: int, batch: int, shape: tuple[int, ...] = ()):
    x0, x1 = bits(k, tag, batch, shape)
    return jnp.sqrt(-2.0 * jnp.log(uniform(x0))) * jnp.cos(jnp.float32(2.0 * np.pi) * uniform(x1))


def uniforms(k, tag: int, batch: int):
    return uniform(bits(k, tag, batch, ())[0])


def randints(k, tag: int, batch: int, n: int):
    if not 0 < n <= ref.MAX_RANGE:
        raise ValueError(f"randint range must be in 1..{ref.MAX_RANGE}, got {n}")
    x0 = bits(k, tag, batch, ())[0]
    return (((x0 >> jnp.uint32(8)) * jnp.uint32(n)) >> jnp.uint32(24)).astype(jnp.int32)
