"""Checkpoint layouts and conversions between the official release, JAX (orbax) and Megatron.

`converters.schema` (the canonical release names and shapes) and `converters.layouts.jax`
(numpy-only transforms) import neither jax nor torch.
"""
