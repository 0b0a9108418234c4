"""Preference fine-tuning of the tiny model (DPO pairs + KTO labels + SFT regulariser).

`--config=configs/tiny_preference.py:LABELS_JSONL` (clips in <dir of LABELS>/clips/). Write a toy
labelled set in the documented format with
`python -c "from mugv.data.preference import write_synthetic; write_synthetic('DIR')"`.
Set init_from to the SFT checkpoint (the frozen reference model is the starting weights).
"""

import ml_collections

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
    c.preference = ml_collections.ConfigDict(
        dict(
            labels=labels or "",
            heldout_labels="",
            clips="",
            batch_size=8,
            heldout_batches=2,
            heldout_seed=99,
            eval_every=20,
            beta_dpo=200.0,
            beta_kto=200.0,
            sft_weight=0.1,
            kto_desirable_weight=1.0,
            kto_undesirable_weight=1.0,
            shift_ratio=1.0,
        )
    )
    c.log_every = 10
    c.checkpoint_every = 60
    return c
