"""The Megatron-Core trainer: schedule, objective, exact resume, torch_dist layout, NaN skip, CLI.

Runs at TP=1 in this process (megatron's one-process gloo world) on the tiny model; the
TP=2 trainer step is checked in tests/cross_backend/test_cross_backend_training.py, PP=2 and CP=2 in
tests/mugv_megatron/test_megatron_trainer_pp_cp.py.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mugv.config import get_config
from mugv.io.megatron import TRACKER
from mugv.layouts import megatron as layout
from mugv.run.driver import NonFiniteLossError
from mugv.training import ObjectiveConfig, OptimConfig, shift_ratio
from mugv_megatron.train import checkpointing, optim
from mugv_megatron.train import objective as obj
from tests.mugv_megatron import helpers

ROOT = Path(__file__).resolve().parents[2]

CFG = get_config("tiny")
OPTIM = OptimConfig(learning_rate=2e-3, warmup_steps=2, weight_decay=0.01, ema_decay=0.9, grad_accum_steps=2)
OBJECTIVE = ObjectiveConfig(i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.25)


def source():
    from mugv.data.synthetic import Bucket, SyntheticTextToLatent

    return SyntheticTextToLatent(
        [Bucket(3, 4, 6, 4), Bucket(2, 4, 4, 4)], in_channels=CFG.in_channels, text_dim=CFG.text_dim
    )


def make_trainer(seed=0):
    return helpers.make_trainer(CFG, OPTIM, OBJECTIVE, seed)


run = helpers.run
full_state = helpers.full_state


# ---------------------------------------------------------------------------------------------
# schedule and objective


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_is_the_jax_schedule(schedule):
    from mugv.training import OptimConfig as JaxOptim
    from mugv_jax.train.step import learning_rate_schedule

    kw = dict(learning_rate=3e-3, warmup_steps=5, schedule=schedule, decay_steps=10, final_lr_ratio=0.1)
    jax_sched = learning_rate_schedule(JaxOptim(**kw))
    cfg = OptimConfig(**kw)
    for k in range(25):
        assert optim.learning_rate(cfg, k) == pytest.approx(float(jax_sched(k)), rel=1e-6, abs=1e-12), k


def test_prepare_applies_draws_as_spec():
    batch = source().batch(0)
    draws = obj.draw(np.random.default_rng(3), batch["latents"].shape, OBJECTIVE)
    draws = obj.Draws(draws.u, draws.eps, np.array([0, 1, 0, 0]), np.array([False, True, False, False]))
    null = torch.randn(CFG.max_text_tokens, CFG.text_dim)
    inputs, target, t = obj.prepare(batch, null, OBJECTIVE, draws)
    x0, eps = torch.from_numpy(batch["latents"]), torch.from_numpy(draws.eps)
    frames, h, w = x0.shape[2:]
    r = shift_ratio((frames, h, w))
    tau = torch.sigmoid(torch.from_numpy(draws.u)) * 1000 / 1000
    assert torch.allclose(t, 1000 * r * tau / (1 + (r - 1) * tau), rtol=1e-6)
    s = (t / 1000)[:, None, None, None, None]
    assert torch.allclose(inputs["x"][0], ((1 - s) * x0 + s * eps)[0])
    assert torch.equal(inputs["x"][1, :, 0], x0[1, :, 0])  # conditioning frame is clean
    assert inputs["x_mask"].tolist()[1] == [False, True, True]
    assert torch.equal(target, x0 - eps)
    length = batch["y"].shape[2]
    assert torch.equal(inputs["y"][1, 0], null[:length]) and inputs["mask"][1].eq(1).all()
    assert torch.equal(inputs["y"][0], torch.from_numpy(batch["y"][0]))
    pred = target + 1.0  # error 1 everywhere
    loss, per_sample = obj.masked_frame_mse(pred, target, inputs["x_mask"])
    assert torch.allclose(per_sample, torch.ones(4)) and math.isclose(float(loss), 1.0, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# resume and checkpoint layout


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """4 steps straight vs 2 steps → checkpoint → fresh trainer (other init seed) → 2 steps."""
    from mugv.data.synthetic import DataIterator

    ckdir = str(tmp_path_factory.mktemp("megatron_ckpt") / "checkpoints")
    straight, it = make_trainer(), DataIterator(source())
    run(straight, it, 4)
    first, it1 = make_trainer(), DataIterator(source())
    run(first, it1, 2)
    checkpointing.save(ckdir, first, it1.get_state(), {"note": "test"})
    at_save = full_state(first)
    second = make_trainer(seed=123)
    meta = checkpointing.restore_latest(ckdir, second)
    it2 = DataIterator(source())
    it2.set_state(meta["data"])
    restored = full_state(second)
    run(second, it2, 2)
    return dict(
        straight=straight, second=second, it=it, it2=it2, ckdir=ckdir, at_save=at_save, restored=restored, first=first
    )


def test_restore_gives_back_the_saved_state(resumed):
    a, b = resumed["at_save"], resumed["restored"]
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["second"].optimizer.count == 4 and resumed["second"].step == 4


def test_resumed_run_is_bit_identical_to_straight_run(resumed):
    a, b = full_state(resumed["straight"]), full_state(resumed["second"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["it"].get_state() == resumed["it2"].get_state() == {"position": 4}
    assert resumed["straight"].counters() == resumed["second"].counters()


def test_checkpoint_layout_and_converter_reader(resumed):
    from mugv.io.torch_dist import TorchDistReader

    ckdir = resumed["ckdir"]
    assert open(os.path.join(ckdir, TRACKER)).read() == "2"
    assert not [n for n in os.listdir(ckdir) if n.endswith(".tmp")]
    reader = TorchDistReader(ckdir)
    assert reader.stored_config == CFG
    want = layout.megatron_state_to_release(
        {n: p.detach().numpy() for n, p in resumed["first"].module.named_parameters()}, CFG
    )
    # Weights at the save were those at step 2 of `first` (it did not train after the save).
    got = dict(reader.items())
    assert set(got) == set(want)
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
    skipped = set(reader.skipped)
    assert "optimizer.state.exp_moving_avg.decoder.layers.mlp.linear_fc1.weight" in skipped
    assert "optimizer.state.exp_avg_sq.start_token" in skipped
    assert checkpointing.NULL_TEXT_KEY in skipped


def test_wrong_model_checkpoint_fails_loudly(resumed):
    from mugv_megatron.train.step import Trainer

    other = get_config("tiny", depth=1)
    tr = Trainer(other, OPTIM, OBJECTIVE, seed=0, use_megatron_optimizer=False)
    with pytest.raises(ValueError, match="the run's model is"):
        checkpointing.restore_latest(resumed["ckdir"], tr)


# ---------------------------------------------------------------------------------------------
# non-finite steps


def test_nonfinite_step_is_skipped_and_counted():
    from mugv.data.synthetic import DataIterator

    tr, it = make_trainer(), DataIterator(source())
    run(tr, it, 1)
    before = full_state(tr)
    bad = next(it)
    bad.pop("prompt_id")
    bad["latents"] = bad["latents"].copy()
    bad["latents"][0, 0, 0, 0, 0] = np.nan
    m = tr.train_step(bad)
    assert not m["finite"] and m["nonfinite_in_a_row"] == 1 and tr.skipped == 1
    after = full_state(tr)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert tr.optimizer.count == 1 and tr.step == 2
    run(tr, it, 1)
    assert tr.nonfinite == 0 and tr.skipped == 1 and tr.optimizer.count == 2


def test_run_stops_after_the_nonfinite_limit(tmp_path, monkeypatch):
    from configs.tiny import get_config as tiny_config
    from mugv.data import synthetic as data_lib
    from mugv_megatron.train import backend as train

    config = tiny_config()
    config.num_steps, config.max_nonfinite_in_a_row, config.log_every = 10, 3, 1
    config.data.buckets = ((2, 4, 4, 4),)
    real = data_lib.SyntheticTextToLatent.batch

    def nan_batch(self, index):
        b = real(self, index)
        b["latents"] = np.full_like(b["latents"], np.nan)
        return b

    monkeypatch.setattr(data_lib.SyntheticTextToLatent, "batch", nan_batch)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        train.train(config, str(tmp_path / "run"))


def test_parallel_sizes_are_checked_before_set_up(tmp_path):
    """pp/cp reach the trainer (tests/mugv_megatron/test_megatron_trainer_pp_cp.py runs them); sizes that
    cannot work are refused, naming the option, before any process group is touched."""
    import ml_collections

    from mugv_megatron.train import backend as train

    opts = train.megatron_options(ml_collections.ConfigDict({"megatron": {"pp": 2}}), {"cp": 2})
    assert (opts["pp"], opts["cp"]) == (2, 2)
    with pytest.raises(ValueError, match="config.megatron.cp must be >= 1"):
        train.megatron_options(ml_collections.ConfigDict(), {"cp": 0})
    from configs.tiny import get_config as tiny_config

    config = tiny_config()
    with pytest.raises(ValueError, match=r"config.megatron.pp=3 does not divide the model's 2 layers"):
        train.train(config, str(tmp_path / "run"), {"pp": 3})


def test_a_batch_split_that_does_not_divide_is_refused_before_set_up(tmp_path):
    """The split mugv_megatron.plan plans (micro-batch × DP × accumulation), checked on every
    global batch of the typed config before any process group, model or workdir exists."""
    from configs.tiny import get_config as tiny_config
    from mugv.run.config import ConfigError
    from mugv_megatron.train import backend as train

    config = tiny_config()
    config.optim.grad_accum_steps = 3
    config.data.buckets = ((2, 4, 4, 4),)
    with pytest.raises(
        ConfigError,
        match=r"^--config.data.buckets\[0\]=\(2, 4, 4, 4\): 4 samples per data-parallel rank \(global batch 4 / "
        r"DP 1\) do not split into config.optim.grad_accum_steps=3 micro-batches",
    ):
        train.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# the command line: metrics, SIGTERM → save and exit 0, resume


def test_cli_sigterm_saves_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mugv_megatron.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.num_steps=100000",
        "--config.log_every=1",
        "--config.checkpoint_every=100000",
        "--config.data.buckets=((2,4,4,4),)",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own process group, signalled whole, as Slurm, timeout and Kubernetes do.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    metrics = workdir / "tensorboard" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-3000:]
    assert b"(sigterm)" in out
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for key in (
        "loss",
        "grad_norm",
        "learning_rate",
        "step_time",
        "tflops_per_device",
        "mfu",
        "tokens_per_second",
        "loss_by_t/q0",
    ):
        assert key in rows[-1], key
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir / "tensorboard"))
    steps = checkpointing.steps(str(workdir / "checkpoints"))
    assert len(steps) == 1 and steps[0] >= rows[-1]["step"]
    k = steps[0]
    # A SIGTERM during start-up (it used to end the process with 143): exit 0, nothing changed.
    from tests.helpers import snapshot

    before = snapshot(workdir)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out.decode()[-3000:]
    assert b"before the first step" in out and snapshot(workdir) == before
    # Resume in this process to k + 2 with the same config.
    from configs.tiny import get_config as tiny_config
    from mugv_megatron.train import backend as train

    config = tiny_config()
    config.num_steps, config.log_every, config.data.buckets = k + 2, 1, ((2, 4, 4, 4),)
    summary = train.train(config, str(workdir))
    assert summary["step"] == k + 2 and summary["stopped_by"] == "num_steps"
    assert checkpointing.steps(str(workdir / "checkpoints"))[-1] == k + 2
    meta = torch.load(workdir / "checkpoints" / f"iter_{k + 2:07d}" / "common.pt", weights_only=False)
    assert meta["mugv"]["data"] == {"position": k + 2}
    assert meta["mugv"]["optimizer"]["count"] == k + 2


def test_unreadable_newest_checkpoint_falls_back_to_previous(resumed, tmp_path, caplog):
    """A truncated newest checkpoint is skipped with a warning; the previous one is restored
    completely, and the failed read leaves nothing half-loaded in the trainer."""
    import shutil

    ckdir = tmp_path / "checkpoints"
    shutil.copytree(resumed["ckdir"], ckdir)
    shutil.copytree(ckdir / "iter_0000002", ckdir / "iter_0000009")
    for f in (ckdir / "iter_0000009").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:1000])
    tr = make_trainer(seed=5)
    with caplog.at_level("WARNING"):
        meta = checkpointing.restore_latest(str(ckdir), tr)
    assert "iter_0000009 is unreadable" in caplog.text
    assert meta["trainer"]["step"] == 2 and tr.step == 2
    got = full_state(tr)
    for k, v in resumed["at_save"].items():
        assert torch.equal(got[k], v), k


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_a_changed_byte_in_the_newest_checkpoint_is_named_and_it_falls_back(resumed, tmp_path, caplog):
    """Before checksums one changed byte in a tensor loaded silently (the resume trained from the
    garbage). Now the digest table names the file and tensor, the checkpoint is moved aside and the
    previous one is restored whole."""
    import shutil

    from mugv.io import digest, torch_dist

    ckdir = tmp_path / "checkpoints"
    shutil.copytree(resumed["ckdir"], ckdir)
    shutil.copytree(ckdir / "iter_0000002", ckdir / "iter_0000009")
    table = torch_dist.read_digests(str(ckdir / "iter_0000009"))
    rel, entry = next((r, e) for r, e in table["files"].items() if "parts" in e)
    start, end, _, tensor = next(p for p in entry["parts"] if p[3].startswith("decoder.layers.mlp.linear_fc1.weight"))
    assert tensor == "decoder.layers.mlp.linear_fc1.weight [chunk at [1, 0, 0]]" or "[chunk at [0, 0, 0]]" in tensor
    _flip(ckdir / "iter_0000009" / rel, (start + end) // 2)
    # The reader the converters and init_from use refuses it too, naming the tensor it reads.
    layer = tensor.split("[chunk at [")[1][0]
    with pytest.raises(digest.CorruptCheckpoint, match=f"{rel}: tensor blocks.{layer}.mlp.fc1.weight"):
        dict(torch_dist.TorchDistReader(str(ckdir / "iter_0000009")).items())
    tr = make_trainer(seed=5)
    with caplog.at_level("WARNING"):
        meta = checkpointing.restore_latest(str(ckdir), tr)
    assert "CHECKPOINT UNREADABLE" in caplog.text and f"{rel}: tensor {tensor}" in caplog.text
    assert meta["trainer"]["step"] == 2 and tr.step == 2
    got = full_state(tr)
    for k, v in resumed["at_save"].items():
        assert torch.equal(got[k], v), k
    aside = [n for n in os.listdir(ckdir) if n.startswith("iter_0000009.unreadable-")]
    assert len(aside) == 1 and checkpointing.steps(str(ckdir)) == [2]  # moved aside, not deleted


def test_a_checkpoint_of_another_model_is_refused_naming_both(resumed):
    from mugv.io.mismatch import IncompatibleCheckpoint
    from mugv_megatron.train.step import Trainer

    other = get_config("tiny", depth=1)
    tr = Trainer(other, OPTIM, OBJECTIVE, seed=0, use_megatron_optimizer=False)
    with pytest.raises(IncompatibleCheckpoint) as e:
        checkpointing.restore_latest(resumed["ckdir"], tr)
    assert "depth: checkpoint 2, run 1" in str(e.value) and "another --workdir" in str(e.value)
    assert checkpointing.steps(resumed["ckdir"]) == [2]
