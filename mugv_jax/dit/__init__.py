"""MUG-DiT in JAX: model, release-checkpoint loading and export."""
from mugv_jax.dit.model import MUGDiT, RuntimeOptions, forward, REMAT_POLICIES
from mugv_jax.dit.checkpoint import load, init, export_release_state_dict, abstract_model

__all__ = ["MUGDiT", "RuntimeOptions", "forward", "REMAT_POLICIES", "load", "init",
           "export_release_state_dict", "abstract_model"]
