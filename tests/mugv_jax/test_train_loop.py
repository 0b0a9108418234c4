"""The training loop: learning, checkpoints across meshes, fault handling, CLI."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mugv.run import data as run_data
from mugv.run.config import ConfigError, as_run_config, model_config_from
from mugv.run.driver import NonFiniteLossError
from mugv_jax.train import backend as train_lib
from mugv_jax.train import checkpointing
from tests.helpers import snapshot
from tests.trainer_helpers import guard_train_steps, host_batch, make_source, make_trainer, to_numpy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny as tiny_config

# Learning: mean loss of the last 20 steps must fall below this fraction of the best caption-blind
# constant prediction's loss (measured: 0.31 after 150 steps with the tiny config's fixed shift).
LEARNED_LOSS_RATIO = 0.5


@pytest.fixture(autouse=True)
def _no_implicit_transfers_in_steps(monkeypatch):
    # Every step of the in-process runs, the driver's included (subprocess runs are not reached).
    guard_train_steps(monkeypatch)


def _config(**overrides):
    c = tiny_config.get_config()
    c.log_every = 1
    c.async_checkpoint = False
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def test_tiny_model_learns_caption_dependent_latents(tmp_path):
    c = _config(num_steps=150, checkpoint_every=1000, **{"sample.every": 100, "sample.steps": 3})
    c.data.buckets = ((2, 4, 6, 16),)
    train_lib.train(c, str(tmp_path))
    rows = [json.loads(l) for l in open(tmp_path / "tensorboard" / "metrics.jsonl")]
    final = np.mean([r["loss"] for r in rows[-20:]])
    src = run_data.synthetic_source(c, model_config_from(c))
    baseline = src.constant_baseline_loss(src.buckets[0])
    assert final < LEARNED_LOSS_RATIO * baseline, (final, baseline)
    # Samples from the EMA were written at step 100 and at the end.
    from safetensors.numpy import load_file

    samples = sorted(os.listdir(tmp_path / "samples"))
    assert samples == ["step_00000100.safetensors", "step_00000150.safetensors"]
    lat = load_file(str(tmp_path / "samples" / samples[-1]))["latents"]
    assert lat.shape == (2, 24, 2, 4, 6) and np.all(np.isfinite(lat))
    # The event files are there for TensorBoard, with the promised scalars.
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert {
        "loss",
        "grad_norm",
        "learning_rate",
        "step_time",
        "tokens_per_second",
        "tflops_per_device",
        "samples_per_second",
        "loss_by_t/q0",
        "mfu",
    } <= set(rows[-1])


def test_restore_onto_a_different_mesh_continues_identically(tmp_path):
    src = make_source()
    batches = [host_batch(src, i) for i in range(4)]
    a = make_trainer((2, 2, 2, 1))
    state = a.init_state(0)
    for b in batches[:2]:
        state, _ = a.train_step(state, a.put_batch(b))
    ck = checkpointing.Checkpointer(str(tmp_path / "ck"), use_async=True)
    ck.save(2, state, {"position": 2}, {"model": a.model_config.to_dict()})
    ck.wait()
    losses_a = []
    for b in batches[2:]:
        state, m = a.train_step(state, a.put_batch(b))
        losses_a.append(float(m["loss"]))
    b8 = make_trainer((8, 1, 1, 1))
    step, restored, data, cfg = checkpointing.Checkpointer(str(tmp_path / "ck")).restore_latest(b8.abstract_state())
    assert step == 2 and data == {"position": 2} and cfg["model"]["hidden_size"] == 144
    assert restored["params"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.mesh.shape["data"] == 8
    losses_b = []
    for b in batches[2:]:
        restored, m = b8.train_step(restored, b8.put_batch(b))
        losses_b.append(float(m["loss"]))
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)


def test_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    t = make_trainer()
    state = t.init_state(0)
    ck = checkpointing.Checkpointer(str(tmp_path), use_async=False)
    ck.save(1, state, {"position": 1}, {})
    ck.save(2, state, {"position": 2}, {})
    ck.wait()
    # Corrupt step 2: truncate every file of its state item.
    for dirpath, _, files in os.walk(tmp_path / "2" / "state"):
        for f in files:
            open(os.path.join(dirpath, f), "w").close()
    with caplog.at_level(logging.WARNING):
        step, _, data, _ = checkpointing.Checkpointer(str(tmp_path)).restore_latest(t.abstract_state())
    assert step == 1 and data == {"position": 1}
    assert "checkpoint" in caplog.text and "unreadable" in caplog.text and "/2" in caplog.text


def test_non_finite_limit_stops_the_run(tmp_path, monkeypatch):
    class NaNSource:
        def __init__(self, inner):
            self.inner, self.buckets = inner, inner.buckets

        def bucket_for(self, i):
            return self.inner.bucket_for(i)

        def batch(self, i):
            b = self.inner.batch(i)
            return dict(b, latents=np.full_like(b["latents"], np.nan)) if i >= 2 else b

    real = run_data.synthetic_source
    monkeypatch.setattr(run_data, "synthetic_source", lambda c, m: NaNSource(real(c, m)))
    c = _config(num_steps=20, checkpoint_every=1000, max_nonfinite_in_a_row=3)
    c.data.buckets = ((2, 4, 6, 8),)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        train_lib.train(c, str(tmp_path))


def _run_cli(workdir, *extra, wait=True, env=None, stderr=subprocess.PIPE):
    cmd = [
        sys.executable,
        "-m",
        "mugv_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.log_every=1",
        "--config.data.buckets=((2,4,6,8),)",
        *extra,
    ]
    # Its own process group: signals go to the group, as Slurm, timeout and Kubernetes send them.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, start_new_session=True
    )
    if wait:
        out, err = proc.communicate(timeout=600)
        return proc.returncode, out, err
    return proc


def _wait_for_step(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "tensorboard", "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path):
            rows = [json.loads(l) for l in open(path) if l.strip()]
            if rows and rows[-1]["step"] >= step:
                return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def _final_params(workdir):
    t = make_trainer((8, 1, 1, 1))
    _, state, _, _ = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(t.abstract_state())
    return int(state["step"]), to_numpy(state["params"])


def test_sigkill_then_resume_matches_an_uninterrupted_run_bitwise(tmp_path):
    """...and the resume compiles its step from the persistent compilation cache that the killed
    start wrote into its workdir (the trainer's default; the suite's shared cache is kept out)."""
    steps = ["--config.num_steps=6", "--config.checkpoint_every=2"]
    rc, out, err = _run_cli(tmp_path / "ref", *steps)
    assert rc == 0, err[-3000:]
    own_cache = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    own_cache.update(JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1")
    # The killed run's log goes to a file: nobody reads a pipe while it runs.
    first_log = open(tmp_path / "killed.log", "w")
    proc = _run_cli(tmp_path / "killed", *steps, wait=False, env=own_cache, stderr=first_log)
    _wait_for_step(tmp_path / "killed", 3, proc)
    # orbax renames a step directory into place only once it is complete.
    t0 = time.time()
    while not os.path.isdir(tmp_path / "killed" / "checkpoints" / "2") and time.time() - t0 < 120:
        assert proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    first_log.close()
    first_err = (tmp_path / "killed.log").read_text()
    assert proc.returncode == -signal.SIGKILL
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit__step_fn'" in first_err, first_err[-3000:]
    cached = os.listdir(tmp_path / "killed" / "jax_cache")
    assert any(name.startswith("jit__step_fn-") for name in cached), cached
    rc, out, err = _run_cli(tmp_path / "killed", *steps, env=own_cache)
    assert rc == 0, err[-3000:]
    assert "resumed from" in err and "at step" in err
    assert "Persistent compilation cache hit for 'jit__step_fn'" in err, err[-3000:]
    assert "CACHE MISS for 'jit__step_fn'" not in err
    ref_step, ref = _final_params(tmp_path / "ref")
    got_step, got = _final_params(tmp_path / "killed")
    assert ref_step == got_step == 6
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(tmp_path):
    proc = _run_cli(tmp_path, "--config.num_steps=100000", "--config.checkpoint_every=100000", wait=False)
    _wait_for_step(tmp_path, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a scheduler sends it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "(sigterm)" in out
    steps = checkpointing.Checkpointer(str(tmp_path / "checkpoints")).steps()
    assert len(steps) == 1 and steps[0] >= 2
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["data"]["buckets"] == [[2, 4, 6, 8]]  # the --config override was applied
    # A SIGTERM during start-up (it used to end the process with 143): exit 0, nothing changed.
    before = snapshot(tmp_path)
    proc = _run_cli(tmp_path, "--config.num_steps=100000", "--config.checkpoint_every=100000", wait=False)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "before the first step" in err and "(sigterm)" in out
    assert snapshot(tmp_path) == before


# "release_ema": a stage that hands over EMA weights (init_weights="ema") started from a release
# file: the file's one set of weights is used.
@pytest.mark.parametrize("kind", ["release", "jax", "release_ema"])
def test_init_from_release_file_or_converted_jax_checkpoint(tmp_path, kind):
    from converters.convert import convert
    from mugv.layouts.jax import flatten
    from mugv_jax import dit
    from mugv_jax.dit.checkpoint import model_from_params
    from tests.helpers import DIT_WEIGHTS, dit_weights

    spec = DIT_WEIGHTS
    if kind == "jax":
        convert(f"release:{DIT_WEIGHTS}", f"jax:{tmp_path / 'converted'}", model="tiny")
        spec = f"jax:{tmp_path / 'converted'}"
    c = _config(num_steps=0, init_from=spec, init_weights="ema" if kind == "release_ema" else "raw")
    summary = train_lib.train(c, str(tmp_path / "run"))
    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(summary["state"]["params"])).items()}
    exported = dit.export_release_state_dict(model_from_params(model_config_from(c), flat))
    for name, ref in dit_weights().items():
        np.testing.assert_array_equal(exported[name], ref)


def test_trains_from_prepared_array_record_shards(tmp_path):
    """The trainer reads the data pipeline's shards (procedural clips, stand-in encoders) and
    resumes the loader's position with the checkpoint."""
    from absl import flags

    from mugv.data import procedural, shards
    from mugv_data import encode
    from mugv_data.encode import ClipInput, PixelBucket
    from mugv_data.text import HashingTextEncoder

    flags.FLAGS.mark_as_parsed()
    buckets = [PixelBucket(17, 32, 48)]
    clips = (
        ClipInput(c.sample_id, "procedural", c.caption, c.frames, c.fps)
        for c in procedural.generate(12, seed=3, num_frames=17, size=32)
    )
    lat, txt = encode.PatchMeanEncoder(), HashingTextEncoder(dim=64, max_length=8)
    examples = list(encode.encode_clips(clips, buckets, lat, txt, batch_size=4))
    ds = shards.write_shards(
        lambda: examples,
        str(tmp_path / "data"),
        buckets=encode.latent_buckets(buckets, lat),
        latent_channels=24,
        text_dim=64,
    )
    c = _config(num_steps=3, checkpoint_every=3)
    # 8 rows: the global batch splits evenly over the 8 devices (a batch of 4 is refused).
    c.data.source, c.data.path, c.data.batch_size, c.data.text_len = "shards", ds, 8, 8
    summary = train_lib.train(c, str(tmp_path / "run"))
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "tensorboard" / "metrics.jsonl")]
    assert rows[-1]["data/skipped_records"] == 0  # unreadable records are counted in the metrics
    cfg = checkpointing.read_config(str(tmp_path / "run" / "checkpoints"))
    assert cfg["data"]["source"] == "shards"
    t = make_trainer((8, 1, 1, 1))
    _, _, data_state, _ = checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints")).restore_latest(
        t.abstract_state()
    )
    assert data_state["step"] == 3
    c.model_overrides.text_dim = 32
    with pytest.raises(ValueError, match="text width 64"):
        train_lib.train(c, str(tmp_path / "run2"))


def test_a_batch_the_mesh_cannot_split_is_refused_before_anything_compiles(tmp_path):
    # 4 samples over data = 8 devices: the trainer used to replicate the batch silently.
    c = _config(num_steps=1)
    c.data.buckets = ((2, 4, 6, 4),)
    with pytest.raises(ConfigError) as e:
        train_lib.train(c, str(tmp_path))
    assert str(e.value).startswith(
        "--config.data.buckets[0]=(2, 4, 6, 4): global batch 4 is not a multiple of optim.grad_accum_steps × "
        "data-parallel ranks (1 × 8): its micro-batch 4 (global batch 4 / optim.grad_accum_steps=1) is not "
        "divisible by data × fsdp = 8"
    )
    assert "make the global batch a multiple of 8" in str(e.value)
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "config.json")


def _flip(path, offset=None):
    size = os.path.getsize(path)
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_a_changed_byte_is_named_set_aside_and_the_step_saved_again(tmp_path, caplog):
    """Before checksums a changed byte in a step loaded silently, and a truncated newest step was
    never replaced: orbax skipped saving any step <= the broken one and the return value was
    ignored. Now the step is named, moved aside, the previous restored, and the step saved again."""
    from mugv.io import orbax as layout

    t = make_trainer()
    state = t.init_state(0)
    ck = checkpointing.Checkpointer(str(tmp_path), use_async=False)
    ck.save(1, state, {"position": 1}, {})
    ck.save(2, state, {"position": 2}, {})
    ck.close()
    table = layout.read_digests(str(tmp_path / "2"))
    biggest = max(table["files"], key=lambda rel: table["files"][rel]["size"])
    _flip(tmp_path / "2" / biggest)
    ck = checkpointing.Checkpointer(str(tmp_path), use_async=False)
    with caplog.at_level(logging.WARNING):
        step, _, data, _ = ck.restore_latest(t.abstract_state())
    assert step == 1 and data == {"position": 1}
    assert "CHECKPOINT UNREADABLE" in caplog.text and biggest in caplog.text
    aside = [n for n in os.listdir(tmp_path) if n.startswith("2.unreadable-")]
    assert len(aside) == 1 and ck.steps() == [1]
    ck.save(2, state, {"position": 22}, {})  # the re-run's save takes the name back
    ck.close()
    step, _, data, _ = checkpointing.Checkpointer(str(tmp_path)).restore_latest(t.abstract_state())
    assert step == 2 and data == {"position": 22}
    assert aside[0] in os.listdir(tmp_path)  # never deleted


def test_a_refused_save_is_an_error(tmp_path):
    t = make_trainer()
    state = t.init_state(0)
    ck = checkpointing.Checkpointer(str(tmp_path), use_async=False)
    ck.save(5, state, {}, {})
    with pytest.raises(checkpointing.SaveRefused, match="declined to save step 3"):
        ck.save(3, state, {}, {})
    ck.close()


def test_rotation_keeps_steps_it_cannot_vouch_for(tmp_path):
    from mugv.io import orbax as layout

    t = make_trainer()
    state = t.init_state(0)
    ck = checkpointing.Checkpointer(str(tmp_path), keep=2, use_async=True)
    ck.save(1, state, {}, {})
    ck.save(2, state, {}, {})
    ck.wait()
    os.remove(tmp_path / "1" / layout.DIGESTS_FILE)  # e.g. written before checksums
    for s in (3, 4):
        ck.save(s, state, {}, {})
    ck.close()
    assert ck.steps() == [1, 3, 4]  # 2 rotated out once 4 was recorded; 1 is not provably ours


def test_a_workdir_of_another_model_is_refused_naming_both(tmp_path):
    """Before, a re-run with another model took the old checkpoints for unreadable, trained from
    random weights and rotated the old run's steps away."""
    from mugv.config import get_config
    from mugv.io.mismatch import IncompatibleCheckpoint
    from mugv.run import tasks

    ck = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), use_async=False)
    ck.save(4, {"step": np.zeros((), np.int32)}, {}, {"model": get_config("tiny").to_dict()})
    ck.close()
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    c = _config()
    c.model_overrides.depth = 1
    run = as_run_config(c)
    backend = train_lib.JaxBackend(run, str(tmp_path), tasks.for_config(run), {})
    with pytest.raises(IncompatibleCheckpoint, match="depth: checkpoint 2, run 1") as e:
        backend.restore()  # what the run loop does first
    assert "another --workdir" in str(e.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
