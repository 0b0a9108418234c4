"""One recipe on both backends: the tiny curriculum gives the same per-step losses and validation
losses on JAX and on Megatron, and a run hands its weights from one backend to the other between
stages (JAX → Megatron → JAX) with the same results as staying on JAX.

Both backends run the same driver (mugv.run.driver) on the same batches (mugv.run.data, image:video
mixing included), draw the same random numbers (mugv.rng) and start from the same weights, so
they differ only by float32 rounding. Tolerance: the cross-backend bound of
tests/cross_backend/test_cross_backend_training.py (loss relative error 1e-5); Adam amplifies rounding-level
gradient differences only in entries whose gradient is itself at rounding level, which moves the
loss far less than that over a few steps.
"""

import json
import os

import numpy as np
import pytest

from configs import tiny_curriculum
from mugv_jax.train import backend as jax_train
from mugv_megatron.train import backend as megatron_train

GOLDEN = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "dit_tiny", "weights.safetensors"
)
STEPS = 3
LOSS_REL = 1e-5
STAGES = ("stage1_image_video", "stage2_clip_2s", "stage2_clip_5s")


def stage_config(stage: str, root: str, init_from: str):
    c = tiny_curriculum.get_config(f"{stage}@{root}")
    c.num_steps = STEPS
    c.log_every = 1
    c.checkpoint_every = STEPS
    c.validation.every = STEPS
    c.async_checkpoint = False
    c.init_from = init_from
    if init_from == GOLDEN:
        c.init_weights = "raw"  # a release file holds one set of weights
    if c.data.mix.anneal_steps:
        c.data.mix.anneal_steps = STEPS
    return c


def rows(workdir: str) -> tuple[list[float], list[float]]:
    """(per-step training losses, validation losses) from a run's metrics.jsonl."""
    out = [json.loads(line) for line in open(os.path.join(workdir, "tensorboard", "metrics.jsonl"))]
    return [r["loss"] for r in out if "loss" in r], [r["val/loss"] for r in out if "val/loss" in r]


def assert_close(a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a, b)
    rel = np.abs(a - b) / np.abs(b)
    print(f"{what}: max relative difference {rel.max():.2e}")
    assert rel.max() <= LOSS_REL, (what, a, b)


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    root_j = str(tmp_path_factory.mktemp("jax_chain"))
    root_m = str(tmp_path_factory.mktemp("mixed_chain"))
    # All on JAX, each stage from the previous stage's EMA.
    prev = GOLDEN
    for stage in STAGES:
        jax_train.train(stage_config(stage, root_j, prev), os.path.join(root_j, stage))
        prev = f"jax:{root_j}/{stage}/checkpoints"
    # Stage 1 on Megatron from the same release weights (image:video mixing, validation); stage 2 on
    # Megatron from JAX's stage 1 (JAX → Megatron); stage 3 on JAX from Megatron's stage 2.
    s1, s2, s3 = STAGES
    megatron_train.train(stage_config(s1, root_m, GOLDEN), os.path.join(root_m, s1))
    megatron_train.train(stage_config(s2, root_m, f"jax:{root_j}/{s1}/checkpoints"), os.path.join(root_m, s2))
    jax_train.train(stage_config(s3, root_m, f"megatron:{root_m}/{s2}/checkpoints"), os.path.join(root_m, s3))
    return root_j, root_m


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_the_same_losses_on_both_paths(chains, stage):
    root_j, root_m = chains
    loss_j, val_j = rows(os.path.join(root_j, stage))
    loss_m, val_m = rows(os.path.join(root_m, stage))
    assert len(loss_j) == STEPS and len(val_j) == 2  # before the first step and at the end
    assert_close(loss_m, loss_j, f"{stage} training losses")
    assert_close(val_m, val_j, f"{stage} validation losses")


def test_the_mixed_chain_really_ran_on_megatron(chains):
    _, root_m = chains
    for stage, backend in zip(STAGES, ("megatron", "megatron", "jax")):
        cfg = json.load(open(os.path.join(root_m, stage, "config.json")))
        assert ("megatron" in cfg and "tp" in cfg["megatron"]) or backend == "jax"
        ckpts = os.listdir(os.path.join(root_m, stage, "checkpoints"))
        assert any(n.startswith("iter_") for n in ckpts) == (backend == "megatron"), (stage, ckpts)
