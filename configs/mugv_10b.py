"""MUG-V 10B training curriculum: `--config=configs/mugv_10b.py:<stage>[@ROOT]`.

Stages follow the paper (docs/reference.md §7; docs/training_recipe.md has the commands). Each stage runs
in workdir ROOT/<stage> (ROOT defaults to runs/mugv_10b) and starts from the previous stage's
final EMA (`init_from=jax:ROOT/<previous>/checkpoints`, `init_weights=ema`) with a fresh
optimizer and its own buckets, batch sizes and schedule. The first stage starts from ROOT/expanded:
the tuned hidden-1728 model widened ×2 by `python -m mugv_jax.recipe.expand`.

  image_360      images + 360p 2 s video; image share annealed 0.6 → 0.1 (MixedLoader)
  video_360_2s   360p, 2 s clips, first-frame (image-to-video) masking on
  video_360_3s   360p, 3 s clips        } clip length raised 2 s → 5 s in sub-stages;
  video_360_5s   360p, 5 s clips        } run each until the validation loss plateaus
  video_720      720p, 5 s clips from the high-quality subset, first-frame masking kept
  sft            annealed SFT: curated subset, cosine decay to 0, checkpoints kept for post-hoc EMA
  preference     DPO + KTO with the SFT loss as regulariser (mugv_jax/recipe/preference.py)

The paper publishes no batch size, step count or learning rate: every bucket's global batch is
TOKENS_PER_STEP video tokens divided by its tokens per sample, rounded down to a multiple of
BATCH_MULTIPLE (the data-parallel width it must divide); learning rates are our choice (µP-style:
the small model's tuned rate is reused after expansion). Buckets are (latent frames, latent height,
latent width, global batch); pixel = latent × 8, pixel frames = 8·(latent frames − 1) + 1
(7 latent frames = 49 frames ≈ 2 s at 24 fps, 10 = 73 ≈ 3 s, 14 = 105 ≈ 5 s at 21 fps).
"""

import ml_collections

from configs.base import base_config

DEFAULT_ROOT = "runs/mugv_10b"
EXPANDED = "expanded"
TOKENS_PER_STEP = 16_000_000
BATCH_MULTIPLE = 64
PATCH = 2

# Aspect buckets per resolution, in latent units (H, W): portrait, landscape, square.
_360P = ((80, 46), (46, 80), (60, 60))
_720P = ((160, 90), (90, 160), (120, 120))


def _batch(frames, h, w):
    tokens = frames * (h // PATCH) * (w // PATCH)
    return max(BATCH_MULTIPLE, TOKENS_PER_STEP // tokens // BATCH_MULTIPLE * BATCH_MULTIPLE)


def _buckets(spatial, frames):
    return tuple((frames, h, w, _batch(frames, h, w)) for h, w in spatial)


# stage → (previous stage, settings); the dict order is the training order.
STAGES = {
    "image_360": (EXPANDED, dict(video=_buckets(_360P, 7), images=_buckets(_360P, 1), image_fraction=(0.6, 0.1),
                                 i2v_prob=0.0, steps=200_000, lr=1e-4)),
    "video_360_2s": ("image_360", dict(video=_buckets(_360P, 7), i2v_prob=0.2, steps=60_000, lr=1e-4)),
    "video_360_3s": ("video_360_2s", dict(video=_buckets(_360P, 10), i2v_prob=0.2, steps=60_000, lr=1e-4)),
    "video_360_5s": ("video_360_3s", dict(video=_buckets(_360P, 14), i2v_prob=0.2, steps=80_000, lr=1e-4)),
    "video_720": ("video_360_5s", dict(video=_buckets(_720P, 14), i2v_prob=0.2, steps=30_000, lr=5e-5)),
    "sft": ("video_720", dict(video=_buckets(_720P, 14), i2v_prob=0.2, steps=10_000, lr=2e-5, sft=True)),
    "preference": ("sft", dict(video=_buckets(_720P, 14), i2v_prob=0.0, steps=2_000, lr=1e-6, preference=True)),
}


def get_config(arg: str = "video_720"):
    stage, _, root = (arg or "").partition("@")
    if stage not in STAGES:
        raise ValueError(f"configs/mugv_10b.py: unknown stage {stage!r}; choose from {list(STAGES)}")
    root = root or DEFAULT_ROOT
    prev, s = STAGES[stage]
    c = base_config()
    c.model = "10b"
    c.stage = stage
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.mesh.ici = dict(data=-1, fsdp=8, tensor=1, context=1)
    c.init_from = f"jax:{root}/{EXPANDED}" if prev == EXPANDED else f"jax:{root}/{prev}/checkpoints"
    c.init_weights = "ema"
    c.num_steps = s["steps"]
    c.optim.learning_rate = s["lr"]
    c.optim.warmup_steps = 1000
    c.optim.ema_decay = 0.9999
    c.data.source = "shards"
    c.data.buckets = s["video"]
    c.data.text_len = 300
    c.objective.i2v_prob = s["i2v_prob"]
    c.objective.i2v_mode = "first"
    c.objective.caption_dropout_prob = 0.1
    if "images" in s:
        c.data.mix.image_buckets = s["images"]
        c.data.mix.image_fraction_start, c.data.mix.image_fraction_end = s["image_fraction"]
        c.data.mix.anneal_steps = s["steps"] // 2
    if s.get("sft"):
        # Annealed SFT on the curated subset (set data.path); checkpoints every 500 steps are all
        # kept so `python -m mugv_jax.recipe.posthoc_ema` can average them afterwards.
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = 0
        c.optim.decay_steps = s["steps"]
        c.optim.final_lr_ratio = 0.0
        c.checkpoint_every = 500
        c.keep_checkpoints = s["steps"] // 500
    else:
        c.checkpoint_every = 1000
    if s.get("preference"):
        c.mode = "preference"
        c.init_from = f"jax:{root}/sft_posthoc_ema"  # written by mugv_jax.recipe.posthoc_ema
        c.optim.warmup_steps = 0
        c.preference = ml_collections.ConfigDict(dict(
            labels="", heldout_labels="", clips="", batch_size=64, heldout_batches=4, heldout_seed=99,
            eval_every=200, beta_dpo=2000.0, beta_kto=2000.0, sft_weight=0.2, kto_desirable_weight=1.0,
            kto_undesirable_weight=1.0, shift_ratio=None))
    c.validation.every = 2000
    c.validation.num_batches = 8
    c.log_every = 10
    return c
