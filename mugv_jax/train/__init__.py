"""The JAX training backend: train state and jitted step (step.py), objective and draws, orbax checkpoints, validation,
preference optimisation (preference.py), and the backend the run driver (mugv.run.driver) drives. `python -m
mugv_jax.train` is the CLI.
"""
