"""Every stage of the 10B curriculum (configs/mugv_10b.py) runs on both backends, at tiny width.

Each stage keeps its recipe — image:video mixing, first-frame conditioning, cosine SFT schedule,
preference mode, checkpoint cadence — and only the size of things shrinks: the tiny model from the
golden release weights, synthetic data in one small bucket per shape kind, two steps. The first
step's loss is the same on both backends (same weights, batch and draws: mugv.rng), which checks
that neither backend silently ignores a recipe field. Fields a backend cannot honour are refused
by name (last test).
"""

import json
import os

import pytest

from configs import mugv_10b
from mugv.data import preference as pref_data
from mugv_jax.train import backend as jax_train
from mugv_megatron.train import backend as megatron_train

GOLDEN = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "dit_tiny", "weights.safetensors"
)
STEPS = 2
LOSS_REL = 1e-5  # tests/cross_backend/test_cross_backend_training.py


def tiny_stage(stage: str, workdir: str):
    c = mugv_10b.get_config(stage)
    c.model, c.model_overrides = "tiny", {}
    c.compute_dtype, c.remat, c.attention = "float32", "none", "xla"
    # Batches of 4 split over data = 4 (the trainer refuses a batch the data axes do not divide);
    # tensor = 2 takes the other devices of the test's 8.
    c.mesh.ici = dict(data=4, fsdp=1, tensor=2, context=1)
    c.init_from, c.init_weights = GOLDEN, "raw"
    c.num_steps, c.log_every, c.checkpoint_every = STEPS, 1, STEPS
    c.async_checkpoint = False
    c.validation.every = 0
    c.optim.grad_accum_steps = 1
    c.data.source, c.data.text_len = "synthetic", 8
    frames = 2 if c.data.buckets[0][0] > 1 else 1
    c.data.buckets = ((frames, 4, 6, 4),)
    if c.data.mix.image_fraction_start or c.data.mix.image_fraction_end:
        c.data.mix.image_buckets = ((1, 4, 6, 4),)
        c.data.mix.anneal_steps = STEPS
    if c.mode == "preference":
        c.preference.labels = pref_data.write_synthetic(
            os.path.join(workdir, "labels"), seed=0, num_prompts=4, pairs_per_prompt=1, labels=False
        )
        c.preference.batch_size = 4
        c.preference.shift_ratio = 1.0
    return c


def _first_loss(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "tensorboard", "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("stage", list(mugv_10b.STAGES))
def test_stage_runs_on_both_backends(stage, tmp_path):
    losses = {}
    for name, train in (("jax", jax_train.train), ("megatron", megatron_train.train)):
        workdir = str(tmp_path / name)
        summary = train(tiny_stage(stage, str(tmp_path)), workdir)
        assert summary["step"] == STEPS and summary["stopped_by"] == "num_steps", (name, summary)
        losses[name] = _first_loss(workdir)
        assert len(losses[name]) == STEPS
    j, m = losses["jax"][0], losses["megatron"][0]
    assert abs(j - m) <= LOSS_REL * abs(j), (stage, j, m)


def test_fields_a_backend_cannot_honour_are_refused_by_name(tmp_path):
    c = tiny_stage("video_360_2s", str(tmp_path))
    c.sample.every = 1
    with pytest.raises(ValueError, match=r"megatron backend cannot honour config\.sample\.every=1"):
        megatron_train.train(c, str(tmp_path / "m"))
    c = tiny_stage("preference", str(tmp_path))
    c.megatron.pp = 2
    with pytest.raises(ValueError, match=r"config\.mode='preference' on the megatron backend.*config\.megatron\.pp=1"):
        megatron_train.train(c, str(tmp_path / "p"))


def test_the_documented_release_start_takes_the_release_weights_on_both_backends(tmp_path):
    """README / docs/megatron_training.md: a 10B stage started from the release with only
    `--config.init_from=/models/dit.pt`; the stage keeps init_weights="ema" (its jax: hand-over),
    and a release file's one set of weights is what both backends start from."""
    import numpy as np
    from safetensors.numpy import load_file

    from mugv.layouts import megatron as mlayout
    from mugv.layouts.jax import flatten
    from mugv.run.config import model_config_from
    from mugv_jax import dit
    from mugv_jax.dit.checkpoint import model_from_params

    golden = load_file(GOLDEN)
    c = tiny_stage("video_720", str(tmp_path))
    c.init_weights = mugv_10b.get_config("video_720").init_weights
    assert c.init_weights == "ema"
    c.num_steps = 0
    summary = jax_train.train(c, str(tmp_path / "jax"))
    flat = {k: np.asarray(v) for k, v in flatten(summary["state"]["params"]).items()}
    model = model_config_from(c)
    exported = dit.export_release_state_dict(model_from_params(model, flat))
    for name, ref in golden.items():
        np.testing.assert_array_equal(exported[name], ref, err_msg=name)
    summary = megatron_train.train(c, str(tmp_path / "megatron"))
    state = {
        k: v.detach().cpu().numpy()
        for k, v in summary["trainer"].module.state_dict().items()
        if not k.endswith("_extra_state")
    }
    for name, ref in mlayout.megatron_state_to_release(state, model).items():
        np.testing.assert_array_equal(ref, golden[name], err_msg=name)
