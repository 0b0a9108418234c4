"""Checkpoint conversion between the release layout, Megatron and JAX."""
