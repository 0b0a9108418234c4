"""The run loop's own decisions, with a stand-in backend (no framework): a resume whose data flags
changed, and what a logged step says about timestep quartiles no sample fell in."""

import json
import os

import numpy as np
import pytest

from mugv.run import driver, tasks
from mugv.run.config import LoopConfig, as_run_config
from mugv.run.metrics import MetricsWriter


class _ShardLoaderState:
    """What a run on prepared shards saved as its data position."""

    STATE = {"step": 3, "seed": 0, "skipped": 0, "skipped_records": []}


class _Backend:
    name, is_main, data_shard, num_devices, device_kind, step = "stand-in", True, (0, 1), 1, "cpu", 3
    checkpoint_dir = "/runs/x/checkpoints"

    def __init__(self, saved_config):
        self.restored_config = saved_config

    def restore(self):
        return dict(_ShardLoaderState.STATE)

    def skipped(self):
        return 0


def test_resume_with_other_data_flags_names_the_flags_the_run_started_with(tmp_path):
    # Started with --config.data.source=shards --config.data.path=/data/mugv_clips/1.0.0, resumed
    # without them: the synthetic iterator cannot take the shard loader's position (it raised
    # `KeyError: 'position'` from deep inside the loop).
    started = as_run_config({"data": {"source": "shards", "path": "/data/mugv_clips/1.0.0", "batch_size": 16}})
    resumed = as_run_config({})
    task = tasks.PretrainTask(resumed)
    loop = LoopConfig(num_steps=5, log_every=1, checkpoint_every=1)
    with pytest.raises(ValueError) as e:
        driver.run(
            loop, str(tmp_path), _Backend(json.loads(json.dumps(started.to_dict()))), task, resolved=resumed.resolved()
        )
    message = str(e.value)
    assert message.startswith("/runs/x/checkpoints: the checkpoint's data position ['seed', 'skipped', ")
    assert "KeyError: 'position'" in message
    assert message.splitlines()[-1] == (
        "  resume with the data flags the run was started with: --config.data.batch_size=16 "
        "--config.data.path=/data/mugv_clips/1.0.0 --config.data.source=shards"
    )
    # The refused resume leaves the workdir's config.json (it describes the checkpoints) alone.
    assert not os.path.exists(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"resume with the --config.data.\* flags the run was started with"):
        driver.run(loop, str(tmp_path), _Backend(None), task, resolved=resumed.resolved())


def test_a_timestep_quartile_without_samples_is_logged_as_absent_not_zero(tmp_path):
    class _Shape:
        data_shard, num_devices, device_kind, recompute = (0, 1), 1, "cpu", "none"

    task = tasks.PretrainTask(as_run_config({}))
    batch = {"latents": np.zeros((2, 24, 2, 4, 6), np.float32), "y": np.zeros((2, 1, 8, 64), np.float32)}
    fetched = {
        "loss": 0.5,
        "grad_norm": 1.0,
        "learning_rate": 1e-3,
        "loss_by_t_quartile": [0.25, 0.0, 0.75, 0.0],
        "loss_by_t_count": [1.0, 0.0, 1.0, 0.0],
    }
    s = task.scalars(batch, fetched, 0.1, _Shape())
    assert (s["loss_by_t/q0"], s["loss_by_t/q1"], s["loss_by_t/q2"], s["loss_by_t/q3"]) == (0.25, None, 0.75, None)
    writer = MetricsWriter(str(tmp_path))
    added = []
    real_add = writer.tb.add_scalar
    writer.tb.add_scalar = lambda tag, value, step: (added.append(tag), real_add(tag, value, step))
    writer.write(1, s)
    writer.close()
    row = json.loads(open(tmp_path / "metrics.jsonl").read())
    assert row["loss_by_t/q1"] is None and row["loss_by_t/q0"] == 0.25
    assert "loss_by_t/q0" in added and "loss_by_t/q1" not in added  # TensorBoard shows no point
