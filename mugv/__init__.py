"""Framework-free facts about MUG-V shared by every backend.

Nothing in this package imports jax or torch: model dimensions (`config`), latent and token
geometry (`geometry`) are importable by the JAX trainer, the Megatron trainer and the converters
alike, so both trainers and the converters agree on one set of numbers.
"""
from mugv.config import DiTConfig, PRESETS, get_config

__all__ = ["DiTConfig", "PRESETS", "get_config"]
