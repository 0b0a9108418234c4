"""Run configs: Python files returning an ml_collections ConfigDict (big_vision style).

Chosen on the command line by path, `--config=configs/mugv_10b.py:video_720`, and overridden per
field, `--config.optim.learning_rate=3e-5`; importable as modules (`from configs import tiny`).
`base.py` holds every field and its default.
"""
