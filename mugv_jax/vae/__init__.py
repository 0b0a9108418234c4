"""The released MUG-V video VAE in Flax NNX (issue 9). See docs/vae.md.

vae = mugv_jax.vae.jit(mugv_jax.vae.load("vae.pt", "release"))
z = vae.encode(video, sample=True, key=key)   # [B, 3, T, H, W] in [-1, 1] → [B, 24, T', H/8, W/8]
video = vae.decode(z, num_frames=T)
"""

from mugv.vae_config import VAE_PRESETS, VAEConfig, get_vae_config, latent_size, release_vae_schema
from mugv_jax.vae.checkpoint import export_release_state_dict, load, random_vae, release_state
from mugv_jax.vae.jitted import JittedVAE, jit
from mugv_jax.vae.model import VideoVAE
from mugv_jax.vae.tiling import Tiled, Tiling

__all__ = [
    "JittedVAE",
    "Tiled",
    "Tiling",
    "VAEConfig",
    "VAE_PRESETS",
    "VideoVAE",
    "export_release_state_dict",
    "get_vae_config",
    "jit",
    "latent_size",
    "load",
    "random_vae",
    "release_state",
    "release_vae_schema",
]
