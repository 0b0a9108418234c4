"""The training recipe beyond one stage: width expansion and post-hoc EMA (preference optimisation is a
training mode: mugv_jax/train/preference.py)."""
