"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Precedence: explicit arguments (the train CLI's --coordinator_address/--num_processes/--process_id)
→ MUGV_COORDINATOR_ADDRESS / MUGV_NUM_PROCESSES / MUGV_PROCESS_ID → JAX's own cluster detection,
which covers Cloud TPU pods and multi-slice (GCE metadata), Slurm (`srun`: SLURM_JOB_ID,
SLURM_NTASKS, SLURM_PROCID, SLURM_STEP_NODELIST), Open MPI and Kubernetes. Every process then sees
all devices of the job; the mesh is built over them and each process feeds only its own part of
the batch (`Trainer.put_batch`, `ShardLoader(process_index, process_count)`); orbax checkpoints
are written cooperatively by all processes.

Must run before anything touches a JAX backend (jax.devices(), any computation).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_ENV = ("MUGV_COORDINATOR_ADDRESS", "MUGV_NUM_PROCESSES", "MUGV_PROCESS_ID")


def settings_from(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ=None,
) -> dict:
    """The explicit jax.distributed.initialize arguments (empty: let JAX detect the cluster)."""
    env = os.environ if environ is None else environ
    address = coordinator_address or env.get(_ENV[0]) or None
    n = num_processes if num_processes is not None else env.get(_ENV[1])
    pid = process_id if process_id is not None else env.get(_ENV[2])
    out = {}
    if address:
        out["coordinator_address"] = address
    try:
        if n is not None and n != "":
            out["num_processes"] = int(n)
        if pid is not None and pid != "":
            out["process_id"] = int(pid)
    except ValueError:
        raise ValueError(
            f"--num_processes/--process_id ({_ENV[1]}/{_ENV[2]}) must be integers, got {n!r} and {pid!r}"
        ) from None
    if out and set(out) != {"coordinator_address", "num_processes", "process_id"}:
        raise ValueError(
            "multi-host: give all of --coordinator_address, --num_processes and "
            f"--process_id (or {', '.join(_ENV)}), or none of them to let JAX detect "
            f"the cluster (TPU pod, Slurm); got {sorted(out)}"
        )
    if out and not 0 <= out["process_id"] < out["num_processes"]:
        raise ValueError(f"--process_id={out['process_id']} must be in [0, --num_processes={out['num_processes']})")
    return out


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join the job's processes into one JAX runtime (idempotent)."""
    if jax.distributed.is_initialized():
        return
    kwargs = settings_from(coordinator_address, num_processes, process_id)
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.split(",")[0] == "cpu":
        # CPU collectives across processes (tests, debugging) need gloo; the default is in-process only.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
