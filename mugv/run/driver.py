"""The one run loop every trainer uses: JAX and Megatron, pretraining, preference and the VAE.

    python -m mugv_jax.train ...      → run(run.loop(), workdir, JaxBackend, PretrainTask | PreferenceTask)
    python -m mugv_megatron.train ... → run(run.loop(), workdir, MegatronBackend, PretrainTask | PreferenceTask)
    python -m mugv_jax.vae train ...  → run(LoopConfig(...), workdir, VAEBackend, VAETask)

It reads the typed cadences and limits of a run (mugv.run.config.LoopConfig), never the config
dict. The driver owns what must not drift between them: config.json, the data iterator and its
position in every checkpoint, resume from the newest readable checkpoint (else a fresh start, from
`config.init_from` when set), the checkpoint / log / evaluation / sample cadence, metrics (one
FLOPs/MFU definition, mugv/flops.py), SIGTERM (save at the next step boundary, exit 0) and
non-finite steps (skipped by the backend, counted; `config.max_nonfinite_in_a_row` in a row stop
the run naming the last good checkpoint).

A *task* is the kind of run: its data, what it logs, how it is evaluated, what it leaves behind.
A *backend* holds the model state on its framework and does one step, one evaluation, one save.
Both are small objects with the methods below; nothing here imports jax or torch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Protocol

from mugv.io.atomic import write_json
from mugv.layouts.jax import flatten
from mugv.run import preemption
from mugv.run.config import ConfigError, LoopConfig
from mugv.run.console import StepClock
from mugv.run.metrics import MetricsWriter

log = logging.getLogger("mugv.run")


class NonFiniteLossError(RuntimeError):
    pass


class Backend(Protocol):
    name: str  # "jax" | "megatron": used in errors naming refused fields
    is_main: bool  # this process writes config.json, logs and samples
    data_shard: tuple[int, int]  # (index, count): which rows of every global batch it reads
    num_devices: int
    device_kind: str
    step: int  # optimizer steps taken (restored or 0)
    checkpoint_dir: str  # where its checkpoints are
    # Optional: the restored checkpoint's run config (plain data), to name what a resume changed.
    restored_config: dict | None

    def restore(self) -> dict | None: ...  # newest readable checkpoint's data state, or None
    def initialize(self) -> None: ...  # fresh state (config.init_from or random)
    def train_step(self, batch: dict) -> Any: ...  # one step; returns a backend metrics handle
    def fetch(self, handle) -> dict: ...  # the handle's metrics as host floats / lists
    def nonfinite_in_a_row(self, handle) -> int: ...
    def skipped(self) -> int: ...
    def evaluate(self, request) -> dict: ...  # the task's evaluation on the current weights
    def save(self, data_state: dict, *, force: bool = False) -> None: ...
    def checkpoints(self) -> list[str]: ...  # complete checkpoints, oldest first
    def any_process(self, flag: bool) -> bool: ...  # True if any process of the run says so
    def finish(self) -> None: ...  # wait for asynchronous saves, release files


class Task(Protocol):
    name: str
    log_dir: str  # under the workdir: TensorBoard events + metrics.jsonl

    def iterator(self, shard: tuple[int, int]): ...
    def evaluation(self) -> Any: ...  # request for backend.evaluate, or None
    def evaluate_every(self) -> int: ...
    def scalars(self, batch: dict, fetched: dict, seconds: float, backend: Backend) -> dict: ...
    def console(self, step: int, total: int, scalars: dict) -> str: ...


def _changed_data_flags(saved: dict | None, resolved: dict) -> list[str]:
    """`--config.data.*=<saved>` for every data field the checkpoint's run had set differently."""
    if not saved or not isinstance(saved.get("data"), dict):
        return []
    now = flatten(json.loads(json.dumps(resolved.get("data", {}))), "data.")  # tuples as the JSON lists
    was = flatten(saved["data"], "data.")

    def fmt(v):  # as a flag takes it: tuples spelled as Python tuples
        as_tuple = lambda x: tuple(as_tuple(i) for i in x) if isinstance(x, list) else x
        return repr(as_tuple(v)).replace(" ", "") if isinstance(v, list) else v

    return [f"--config.{k}={fmt(v)}" for k, v in sorted(was.items()) if k not in now or now[k] != v]


def restore_data_state(it, data_state: dict, backend, resolved: dict) -> None:
    """Put the iterator where the checkpoint left it; a position of another kind of data (the
    run was started with other --config.data flags) is refused naming those flags."""
    try:
        it.set_state(data_state)
    except (KeyError, ValueError, TypeError) as e:
        changed = _changed_data_flags(getattr(backend, "restored_config", None), resolved)
        hint = (
            "resume with the data flags the run was started with: " + " ".join(changed)
            if changed
            else "resume with the --config.data.* flags the run was started with (in the checkpoint's config)"
        )
        raise ConfigError(
            f"{backend.checkpoint_dir}: the checkpoint's data position {sorted(data_state)} does not fit "
            f"this run's data ({type(e).__name__}: {e});\n  {hint}"
        ) from None


def run(loop: LoopConfig, workdir: str, backend: Backend, task: Task, *, resolved: dict) -> dict:
    """Run (or resume) `task` on `backend` until loop.num_steps; returns a summary
    {step, loss, skipped, stopped_by, evaluations}. `resolved` (the run config as plain data) is
    written to <workdir>/config.json once the run has started (a refused resume leaves it).

    A SIGTERM (remembered from the process's start when its `__main__` called
    `preemption.install()`) saves at the next step boundary and returns; one that arrives before
    the first step returns before anything is written."""
    with preemption.handling():
        try:
            return _run(loop, workdir, backend, task, resolved)
        finally:
            preemption.reset()


def _run(loop: LoopConfig, workdir: str, backend: Backend, task: Task, resolved: dict) -> dict:
    os.makedirs(workdir, exist_ok=True)
    it = task.iterator(backend.data_shard)
    data_state = backend.restore()
    restored = data_state is not None
    if restored:
        restore_data_state(it, data_state, backend, resolved)
        log.info("resumed from %s at step %d (%s backend)", backend.checkpoint_dir, backend.step, backend.name)
    else:
        backend.initialize()
    # Every process must agree to stop (a collective save would hang on the others).
    if backend.any_process(preemption.requested()):
        log.warning("SIGTERM received before the first step: exiting with nothing written or changed")
        if hasattr(it, "close"):
            it.close()
        return {
            "step": backend.step,
            "loss": None,
            "skipped": backend.skipped(),
            "stopped_by": "sigterm",
            "evaluations": [],
        }
    if backend.is_main:
        write_json(os.path.join(workdir, "config.json"), resolved)
    evaluation = task.evaluation()
    eval_every = task.evaluate_every() if evaluation is not None else 0
    sample_every = loop.sample_every if hasattr(backend, "write_samples") else 0
    profile_start, profile_steps = loop.profile.start_step, loop.profile.num_steps

    writer = MetricsWriter(os.path.join(workdir, task.log_dir), enabled=backend.is_main)
    total = loop.num_steps
    summary: dict = {
        "step": backend.step,
        "loss": None,
        "skipped": backend.skipped(),
        "stopped_by": "num_steps",
        "evaluations": [],
    }

    def evaluate():
        vals = backend.evaluate(evaluation)
        writer.write(backend.step, vals)
        summary["evaluations"].append({"step": backend.step, **vals})
        if backend.is_main:
            log.info("step %d: %s", backend.step, " ".join(f"{k}={v:.5g}" for k, v in sorted(vals.items())))
        return vals

    def save(force=False):
        backend.save(it.get_state(), force=force)

    window_t, window_steps = time.perf_counter(), 0
    clock = StepClock(backend.step, total)
    profiling = False
    first_batch = None
    try:
        if evaluation is not None and not restored:
            evaluate()  # the starting point of the curve
        while backend.step < total:
            if profile_start >= 0 and backend.step == profile_start and backend.is_main:
                backend.start_profile(os.path.join(workdir, "profile"))
                profiling = True
            batch = next(it)
            if first_batch is None:
                first_batch = batch
                if backend.is_main and getattr(backend, "first_step_note", None):
                    log.info(backend.first_step_note)  # e.g. a JAX compile: minutes of silence otherwise
            handle = backend.train_step(batch)
            clock.stepped(backend.step)
            window_steps += 1
            step = backend.step
            if profiling and step >= profile_start + profile_steps:
                backend.stop_profile()
                profiling = False
            if step % loop.log_every == 0 or step == total:
                fetched = backend.fetch(handle)  # waits for the step: time the window after it
                dt = (time.perf_counter() - window_t) / window_steps
                scalars = task.scalars(batch, fetched, dt, backend)
                scalars["skipped_steps"] = backend.skipped()
                scalars["data/skipped_records"] = int(getattr(it, "skipped", 0) or 0)
                writer.write(step, scalars)
                if backend.is_main:
                    writer.print(f"{task.console(step, total, scalars)} | {clock.suffix(step)}")
                summary.update(loss=scalars.get("loss"), skipped=scalars["skipped_steps"])
                window_t, window_steps = time.perf_counter(), 0
            nonfinite = backend.nonfinite_in_a_row(handle)
            if nonfinite:
                log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, nonfinite)
                limit = loop.max_nonfinite_in_a_row
                if nonfinite >= limit:
                    good = backend.checkpoints()
                    raise NonFiniteLossError(
                        f"{nonfinite} non-finite steps in a row (limit config.max_nonfinite_in_a_row="
                        f"{limit}) at step {step}; last good checkpoint: "
                        f"{good[-1] if good else 'none'}"
                    )
            # Every process must agree to stop, or the collective save would hang on the others.
            if backend.any_process(preemption.requested()):
                log.warning("SIGTERM received: saving step %d and exiting", step)
                save(force=True)
                summary["stopped_by"] = "sigterm"
                break
            if step % loop.checkpoint_every == 0 or step == total:
                save()
            if eval_every > 0 and (step % eval_every == 0 or step == total):
                evaluate()
            if sample_every > 0 and (step % sample_every == 0 or step == total) and backend.is_main:
                path = backend.write_samples(first_batch, step)
                log.info("step %d: wrote samples %s", step, path)
        summary["step"] = backend.step
        summary["skipped"] = backend.skipped()
        backend.finish()
    finally:
        if profiling:
            backend.stop_profile()
        writer.close()
        if hasattr(it, "close"):
            it.close()
    return summary
