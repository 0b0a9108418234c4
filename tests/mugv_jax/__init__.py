"""The JAX backend: DiT, attention and context parallelism, trainer, recipe, sampler, planner."""
