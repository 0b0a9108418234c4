"""Rectified-flow sampling with classifier-free guidance (sampler.py) and its CLI (`python -m mugv_jax.sample`)."""
