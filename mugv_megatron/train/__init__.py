"""The Megatron training backend: the step (step.py), optimizer, EMA, objective, torch_dist checkpoints, validation,
preference, and the backend the run driver drives. `python -m mugv_megatron.train` is the CLI.
"""
