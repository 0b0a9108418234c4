"""The tiny model on synthetic caption-dependent latents: the bundled main job and the tests.

`--config=configs/tiny.py` (default) or `configs/tiny.py:i2v` to train with image-to-video
conditioning frames as well; `configs/tiny.py:lora` fine-tunes rank-4 LoRA adapters on every
target (the base frozen; start it from a release file with `--config.init_from=dit.pt`).
"""

from configs.base import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.model = "tiny"
    c.num_steps = 800
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    c.optim.ema_decay = 0.99
    # Toy latents would get a shift ratio r < 1 from the resolution rule (almost no high-noise
    # training); a fixed r = 1 trains the whole noise range. Dropout trains the null caption that
    # classifier-free guidance needs.
    c.objective.shift_ratio = 1.0
    c.objective.caption_dropout_prob = 0.1
    c.data.buckets = ((2, 4, 6, 16), (3, 4, 4, 16))
    c.log_every = 100
    c.checkpoint_every = 400
    if arg == "i2v":
        c.objective.i2v_prob = 0.5
        c.objective.i2v_mode = "quarter"
    elif arg == "lora":
        c.lora.rank = 4
        c.lora.alpha = 4.0
        c.num_steps = 200
        c.checkpoint_every = 100
    elif arg:
        raise ValueError(f"configs/tiny.py: unknown argument {arg!r} (known: i2v, lora)")
    return c
