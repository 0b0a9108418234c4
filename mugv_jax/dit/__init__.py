"""MUG-DiT in JAX: model, release-checkpoint loading and export."""

from mugv_jax.dit.checkpoint import abstract_model, export_release_state_dict, init, load
from mugv_jax.dit.model import REMAT_POLICIES, MUGDiT, RuntimeOptions, forward

__all__ = [
    "MUGDiT",
    "RuntimeOptions",
    "forward",
    "REMAT_POLICIES",
    "load",
    "init",
    "export_release_state_dict",
    "abstract_model",
]
