"""The paper's curriculum at toy scale: `--config=configs/tiny_curriculum.py:<stage>[@ROOT]`.

Same shape as configs/mugv_10b.py (docs/training_recipe.md): a half-width `small` model (hidden
72, one head of 72) is trained first, widened ×2 to the tiny model (hidden 144, two heads) with
`python -m mugv_jax.recipe.expand --src jax:ROOT/small/checkpoints --dst ROOT/expanded`, then the stages
run in order, each in workdir ROOT/<stage> and initialised from the previous stage's final EMA
(`init_from=jax:ROOT/<previous>/checkpoints`, `init_weights=ema`) with a fresh optimizer, its own
buckets, batch sizes and schedule. ROOT defaults to runs/tiny_curriculum.

Toy stand-ins: "images" are one-latent-frame buckets, "360p" is 4×6 latents, "720p" is 8×12,
"2 s → 5 s" is 2 → 3 latent frames; the SFT "curated subset" is a two-caption synthetic set.
"""

from configs.base import base_config

DEFAULT_ROOT = "runs/tiny_curriculum"
EXPANDED = "expanded"  # the widened small model, written by mugv_jax.recipe.expand

# stage → (previous stage or EXPANDED or None, settings). Order is the training order.
STAGES = {
    "small": (
        None,
        dict(
            model_overrides=dict(hidden_size=72, num_heads=1),
            video=((2, 4, 6, 8),),
            images=((1, 4, 6, 16),),
            image_fraction=(0.7, 0.3),
            steps=200,
            lr=3e-3,
        ),
    ),
    "stage1_image_video": (
        EXPANDED,
        dict(video=((2, 4, 6, 8),), images=((1, 4, 6, 16),), image_fraction=(0.5, 0.1), steps=200, lr=2e-3),
    ),
    "stage2_clip_2s": (
        "stage1_image_video",
        dict(video=((2, 4, 6, 8), (2, 6, 4, 8)), i2v_prob=0.3, steps=100, lr=2e-3),
    ),
    "stage2_clip_5s": ("stage2_clip_2s", dict(video=((3, 4, 6, 8), (3, 6, 4, 8)), i2v_prob=0.3, steps=100, lr=2e-3)),
    "stage3_720p": ("stage2_clip_5s", dict(video=((3, 8, 12, 4),), i2v_prob=0.3, steps=100, lr=1e-3)),
    "sft": ("stage3_720p", dict(video=((3, 8, 12, 4),), i2v_prob=0.3, steps=100, lr=1e-3, sft=True)),
}


def parse_arg(arg, stages, default_root, config_file):
    stage, _, root = (arg or "").partition("@")
    if stage not in stages:
        raise ValueError(f"{config_file}: unknown stage {stage!r}; choose from {list(stages)}")
    return stage, root or default_root


def get_config(arg: str | None = "stage1_image_video"):
    stage, root = parse_arg(arg, STAGES, DEFAULT_ROOT, "configs/tiny_curriculum.py")
    prev, s = STAGES[stage]
    c = base_config()
    c.model = "tiny"
    for field, value in s.get("model_overrides", {}).items():
        c.model_overrides[field] = value
    c.stage = stage
    c.init_from = (
        "" if prev is None else (f"jax:{root}/{EXPANDED}" if prev == EXPANDED else f"jax:{root}/{prev}/checkpoints")
    )
    c.init_weights = "ema"
    c.num_steps = s["steps"]
    c.optim.learning_rate = s["lr"]
    c.optim.warmup_steps = 10
    c.optim.ema_decay = 0.9
    if s.get("sft"):
        # Annealed SFT: no warm-up, cosine decay to zero over the stage on a curated subset.
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = 0
        c.optim.decay_steps = s["steps"]
        c.data.num_prompts = 2
    c.objective.shift_ratio = 1.0
    c.objective.caption_dropout_prob = 0.1
    c.objective.i2v_prob = s.get("i2v_prob", 0.0)
    c.objective.i2v_mode = "first"
    c.data.buckets = s["video"]
    if "images" in s:
        c.data.mix.image_buckets = s["images"]
        c.data.mix.image_fraction_start, c.data.mix.image_fraction_end = s["image_fraction"]
        c.data.mix.anneal_steps = s["steps"]
    c.log_every = 10
    c.checkpoint_every = s["steps"]
    c.validation.every = max(1, s["steps"] // 4)
    c.validation.num_batches = 1
    return c
