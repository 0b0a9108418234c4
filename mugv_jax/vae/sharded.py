"""Batched VAE encode/decode sharded over the mesh's batch axes (data parallel).

The clips of a batch are split over the mesh axes that `mugv_jax.parallel.sharding` maps the logical
`batch` axis to (data, fsdp); every device runs the whole chunked (and optionally tiled)
pipeline on its own clips under `shard_map`, with the VAE weights replicated. The VAE is small
(412 M parameters) next to its activations, so replicating weights and splitting clips is the
layout that bounds per-device memory; each device's memory is that of one chunk of one clip.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mugv_jax.backend_options import convolution_options
from mugv_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec
from mugv_jax.vae.model import VideoVAE
from mugv_jax.vae.tiling import Tiled, Tiling


def batch_spec(mesh: Mesh, ndim: int = 5) -> P:
    """PartitionSpec of a [B, ...] tensor: B over the mesh axes of the logical `batch` axis."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), DEFAULT_RULES, mesh)


def _batch_devices(mesh: Mesh, spec: P) -> int:
    axes = spec[0] if spec and spec[0] is not None else ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def _pipeline(graphdef, state, tiling: Tiling | None):
    model = nnx.merge(graphdef, state)
    return Tiled(model, tiling) if tiling is not None else model


def sharded_encode(model: VideoVAE, mesh: Mesh, tiling: Tiling | None = None) -> Callable:
    """fn(video [B,3,T,H,W], noise=None) → normalised latents; posterior mode when noise is None.

    B must be divisible by the number of devices on the batch axes; `noise` (the latents' shape)
    turns on sampling. Compiled once per input shape.
    """
    graphdef, state = nnx.split(model)
    spec = batch_spec(mesh)
    replicated = jax.tree.map(lambda _: P(), state)

    def local_mode(state, x):
        return _pipeline(graphdef, state, tiling).encode(x)

    def local_sample(state, x, noise):
        return _pipeline(graphdef, state, tiling).encode(x, sample=True, noise=noise)

    options = convolution_options()
    mode = jax.jit(
        jax.shard_map(local_mode, mesh=mesh, in_specs=(replicated, spec), out_specs=spec, check_vma=False),
        compiler_options=options,
    )
    sample = jax.jit(
        jax.shard_map(local_sample, mesh=mesh, in_specs=(replicated, spec, spec), out_specs=spec, check_vma=False),
        compiler_options=options,
    )
    sharding = NamedSharding(mesh, spec)

    def call(x, noise=None):
        n = _batch_devices(mesh, spec)
        if x.shape[0] % n:
            raise ValueError(
                f"sharded_encode: batch {x.shape[0]} is not divisible by the {n} devices "
                f"of the mesh's batch axes {spec[0]}"
            )
        x = jax.device_put(jnp.asarray(x), sharding)
        if noise is None:
            return mode(state, x)
        return sample(state, x, jax.device_put(jnp.asarray(noise), sharding))

    return call


def sharded_decode(model: VideoVAE, mesh: Mesh, num_frames: int, tiling: Tiling | None = None) -> Callable:
    """fn(latents [B,E,L,h,w]) → video [B,3,num_frames,8h,8w], clips split over the batch axes."""
    graphdef, state = nnx.split(model)
    spec = batch_spec(mesh)
    replicated = jax.tree.map(lambda _: P(), state)

    def local(state, z):
        return _pipeline(graphdef, state, tiling).decode(z, num_frames)

    fn = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(replicated, spec), out_specs=spec, check_vma=False),
        compiler_options=convolution_options(),
    )

    def call(z):
        n = _batch_devices(mesh, spec)
        if z.shape[0] % n:
            raise ValueError(
                f"sharded_decode: batch {z.shape[0]} is not divisible by the {n} devices "
                f"of the mesh's batch axes {spec[0]}"
            )
        return fn(state, jax.device_put(jnp.asarray(z), NamedSharding(mesh, spec)))

    return call
