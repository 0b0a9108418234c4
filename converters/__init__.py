"""Checkpoint conversions between the official release, JAX (orbax) and Megatron.

The schema, the layouts and release-file IO live in the framework-free core (`mugv.schema`,
`mugv.layouts`, `mugv.io`); this package adds the training formats (`formats/jax.py`,
`formats/megatron.py`), config detection, the conversion pipeline and the CLI.
"""
