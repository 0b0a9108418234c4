"""MUG-V 10B training stages: `--config=configs/mugv_10b.py:<stage>`.

Stages follow the paper's curriculum (paper.md §1.3): image + 360p video pre-training, 360p video
with clips growing from 2 s to 5 s and first-frame (image-to-video) masking, 720p 5 s video, then
annealed SFT with a decaying learning rate. The paper publishes neither batch sizes nor learning
rates per stage: the global batch sizes below keep roughly 1–2 M video tokens per step and the
rates are the reference trainer's (1e-5, warm-up 100); tune them for your pod.

Buckets are (latent frames, latent height, latent width, global batch); pixel = latent × 8 and
pixel frames ≈ 8·(latent frames − 1) + 1. Each bucket has one compiled step.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from base import base_config  # noqa: E402

# Aspect buckets per resolution, in latent units (H, W): portrait, landscape, square.
_360P = ((80, 46), (46, 80), (60, 60))
_256P = ((32, 32), (24, 40), (40, 24))
_480P = ((106, 60), (60, 106), (80, 80))
_720P = ((160, 90), (90, 160), (120, 120))


def _buckets(spatial, frames, batch):
    return tuple((frames, h, w, batch) for h, w in spatial)


STAGES = {
    # images (one latent frame) and short low-resolution video
    "image": dict(buckets=_buckets(_256P, 1, 2048) + _buckets(_360P, 1, 512), i2v_prob=0.0),
    "video_256": dict(buckets=_buckets(_256P, 7, 256) + _buckets(_256P, 14, 128), i2v_prob=0.0),
    "video_360": dict(buckets=_buckets(_360P, 7, 128) + _buckets(_360P, 14, 64), i2v_prob=0.2),
    "video_480": dict(buckets=_buckets(_480P, 14, 32), i2v_prob=0.2),
    "video_720": dict(buckets=_buckets(_720P, 14, 32), i2v_prob=0.2),
    "sft": dict(buckets=_buckets(_720P, 14, 32), i2v_prob=0.2, schedule="cosine"),
}


def get_config(stage: str = "video_720"):
    if stage not in STAGES:
        raise ValueError(f"configs/mugv_10b.py: unknown stage {stage!r}; choose from {sorted(STAGES)}")
    s = STAGES[stage]
    c = base_config()
    c.model = "10b"
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.num_steps = 100_000
    c.mesh.ici = dict(data=-1, fsdp=8, tensor=1, context=1)
    c.data.buckets = s["buckets"]
    c.data.text_len = 300
    c.objective.i2v_prob = s["i2v_prob"]
    c.objective.i2v_mode = "first" if stage != "video_360" else "quarter"
    c.objective.caption_dropout_prob = 0.1
    if s.get("schedule") == "cosine":
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = 0
        c.optim.decay_steps = 10_000
        c.num_steps = 10_000
    c.checkpoint_every = 1000
    c.log_every = 10
    return c
