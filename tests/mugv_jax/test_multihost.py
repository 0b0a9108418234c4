"""Multi-host: 2 processes × 4 CPU devices (gloo collectives) train like 1 process × 8 devices.

Both runs use the real CLI/trainer (`mugv_jax.train`) on the same (data 4, fsdp 2) mesh;
the 2-process run starts through --coordinator_address/--num_processes/--process_id, feeds each
process its half of the batch and writes one orbax checkpoint cooperatively, which is restored
here onto the 8 local devices.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mugv_jax.parallel import distributed
from mugv_jax.train import backend as train_lib
from mugv_jax.train import checkpointing
from tests.trainer_helpers import to_numpy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny as tiny_config

STEPS = 3
# float32; the only difference is where the gradient all-reduce sums (gloo across processes vs
# in-process), so per-step losses and final parameters agree to rounding. Adam's eps is raised to
# 1e-3 for this test: with eps=1e-10 a gradient component at rounding level (~1e-12) whose sign
# differs between summation orders moves its parameter by ±lr either way (measured 4.8e-5 relative
# after 3 steps), which is Adam's normalisation, not a multi-host difference.
RTOL = 1e-5
OVERRIDES = {
    "num_steps": STEPS,
    "log_every": 1,
    "checkpoint_every": STEPS,
    "async_checkpoint": False,
    "optim.warmup_steps": 0,
    "optim.eps": 1e-3,
    "mesh.ici.data": -1,
    "mesh.ici.fsdp": 2,
}
BUCKETS = ((2, 4, 6, 8),)  # 4 rows per process, 8 global = data × fsdp (the sharding comes from the global shape)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir):
    with open(os.path.join(workdir, "tensorboard", "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _start_workers(workdir):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + [f"--config.data.buckets={BUCKETS!r}"]
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mugv_jax.train",
                f"--config={ROOT}/configs/tiny.py",
                f"--workdir={workdir}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *flags,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def test_two_processes_match_one_process(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    workers = _start_workers(multi)  # runs while the single-process reference trains here
    c = tiny_config.get_config()
    for k, v in OVERRIDES.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    c.data.buckets = BUCKETS
    ref = train_lib.train(c, single)
    logs = [w.communicate(timeout=600)[0] for w in workers]
    for i, (w, log) in enumerate(zip(workers, logs)):
        assert w.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    assert "process 1 of 2, 4 local / 8 global devices" in logs[1]

    ref_losses, multi_losses = _losses(single), _losses(multi)
    assert len(ref_losses) == len(multi_losses) == STEPS
    print("per-step loss relative differences:", [abs(a - b) / abs(b) for a, b in zip(multi_losses, ref_losses)])
    np.testing.assert_allclose(multi_losses, ref_losses, rtol=RTOL)

    # The checkpoint both processes wrote restores onto this process's 8 devices.
    trainer = train_lib.build_trainer(c)  # this process's 8 devices, the config's mesh
    ckpt = checkpointing.Checkpointer(os.path.join(multi, "checkpoints"), use_async=False)
    state, data_state, _ = ckpt.restore(STEPS, trainer.abstract_state())
    ckpt.close()
    assert int(state["step"]) == STEPS
    got, want = to_numpy(state["params"]), to_numpy(ref["state"]["params"])
    worst = max(
        float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-12)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )
    print(f"worst relative parameter difference {worst:.2e}")
    assert worst <= RTOL, f"worst relative parameter difference {worst:.2e}"


def test_settings_from_flags_and_environment():
    env = {"MUGV_COORDINATOR_ADDRESS": "10.0.0.1:1234", "MUGV_NUM_PROCESSES": "4", "MUGV_PROCESS_ID": "3"}
    assert distributed.settings_from(environ=env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
    }
    # Flags win over the environment; nothing given means JAX's own detection (TPU pod, Slurm).
    assert distributed.settings_from("h:1", 2, 0, environ=env)["num_processes"] == 2
    assert distributed.settings_from(environ={}) == {}
    with pytest.raises(ValueError, match="all of --coordinator_address"):
        distributed.settings_from("h:1", environ={})
    with pytest.raises(ValueError, match="--process_id=5"):
        distributed.settings_from("h:1", 2, 5, environ={})
