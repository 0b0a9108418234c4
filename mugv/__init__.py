"""Framework-free facts about MUG-V shared by every backend.

Nothing in this package imports jax or torch at import time: model dimensions (`config`), latent
and token geometry (`geometry`), FLOPs, the release parameter schema (`schema`), the backends'
layouts as maps to and from it (`layouts`) and release-checkpoint IO (`io`) are importable by the
JAX trainer, the Megatron trainer and the converters alike. Dependencies point one way:
`mugv` ← backends (`mugv_jax`, `mugv_megatron`) ← converters and apps.
"""

from mugv.config import PRESETS, DiTConfig, get_config

__all__ = ["DiTConfig", "PRESETS", "get_config"]
