"""Preference fine-tuning of the tiny model (DPO pairs + KTO labels + SFT regulariser).

`--config=configs/tiny_preference.py:LABELS_JSONL` (clips in <dir of LABELS>/clips/). Write a toy
labelled set in the documented format with
`python -c "from mugv.data.preference import write_synthetic; write_synthetic('DIR')"`.
Set init_from to the SFT checkpoint (the frozen reference model is the starting weights).
"""

from configs.base import base_config


def get_config(labels: str | None = None):
    c = base_config()
    c.model = "tiny"
    c.mode = "preference"
    c.init_from = ""
    c.init_weights = "ema"
    c.num_steps = 60
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 0
    c.optim.ema_decay = 0.9
    c.preference.labels = labels or ""  # the other fields: mugv.training.PreferenceConfig's defaults
    c.preference.shift_ratio = 1.0
    c.log_every = 10
    c.checkpoint_every = 60
    return c
