"""The JAX video VAE: golden parity, checkpoints, tiling, training, CLI."""
