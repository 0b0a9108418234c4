"""Orbax checkpoints of the JAX trainer.

The layout is mugv/io/orbax.py's (the converters and `init_from` read it there):
`<workdir>/checkpoints/<step>/` managed by an orbax CheckpointManager (async, atomic: a step
directory appears only when complete), with the items `state` (the train-state pytree: params,
opt_state, ema, null_text, step, rng, nonfinite, skipped; params/ema nested dicts keyed by the JAX
layout's dotted paths, e.g. state["params"]["blocks"]["attn"]["qkv"]["kernel"]), `data` (the data
iterator's JSON state) and `config` (the resolved run config, the model's DiTConfig under
"model"), plus the step's digest table (`mugv_digests.json`), recorded once the step is complete.
Restoring takes an abstract target with shardings, so a checkpoint saved on one mesh restores onto
any other mesh or device count.

Nothing is lost or used silently wrong:
* a resume checks the newest step against its digest table and refuses a step of another model or
  state layout (`IncompatibleCheckpoint`, naming both); one that does not match its table or does
  not load is reported loudly, moved aside (`<step>.unreadable-<time>`) and the previous one used,
  so the re-run's save of that step replaces it;
* a save orbax refuses is an error (`SaveRefused`), never ignored;
* rotation (`keep`) deletes older steps only once the newest save is recorded with its table, and
  only steps that carry a table (written by mugv), never moved-aside ones.
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

from mugv.io import orbax as layout
from mugv.io.atomic import quarantine
from mugv.io.mismatch import IncompatibleCheckpoint
from mugv.io.orbax import CONFIG, DATA, MODEL, STATE, TRAINER_ITEMS

log = logging.getLogger(__name__)


class SaveRefused(RuntimeError):
    """orbax declined to write a step (its save returned False)."""


def _key_paths(tree) -> dict[tuple[str, ...], tuple]:
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        out[key] = tuple(getattr(leaf, "shape", ()))
    return out


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _single_replica_writes_on_cpu() -> None:
    """On the CPU, write each replicated shard from one replica (orbax's default on GPU).

    orbax's replica-parallel saving (its CPU and TPU default) splits every replicated shard between
    the replicas that hold it, slicing it with an eager XLA op, one compile per slice shape: ~1,400
    compiles and ~20 s per save of the tiny model on 8 fake CPU devices (55 s on a loaded 2-core
    VM), where all the "replicas" share one host's disk anyway. On a pod the split spreads the write
    over hosts, so TPU keeps it. The files hold the same arrays either way; restores are unchanged."""
    import jax
    from orbax.checkpoint import type_handlers

    # orbax's default handler keeps an array metadata store, which has no public name (0.12.8).
    from orbax.checkpoint._src.metadata import array_metadata_store

    if jax.default_backend() != "cpu" or getattr(_single_replica_writes_on_cpu, "done", False):
        return
    handler = type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=array_metadata_store.Store())
    type_handlers.register_type_handler(jax.Array, handler, override=True)
    _single_replica_writes_on_cpu.done = True


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, use_async: bool = True):
        _single_replica_writes_on_cpu()
        self.directory = os.path.abspath(directory)
        self.keep = keep
        # Rotation is ours (`_rotate`): orbax's max_to_keep would delete steps it did not verify.
        # cleanup_tmp_directories: a save killed half-way leaves orbax's temporary directory.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=use_async, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=TRAINER_ITEMS)
        self._unrecorded: list[int] = []  # steps saved here whose digest table is not yet written

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> None:
        """Save `step` (asynchronously when the manager is); raises SaveRefused if orbax declines."""
        self._record()
        items = {
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data_state),
            CONFIG: ocp.args.JsonSave(config),
        }
        if not self.manager.save(step, args=ocp.args.Composite(**items), force=force):
            raise SaveRefused(
                f"orbax declined to save step {step} in {self.directory} (steps there: {self.steps()}); "
                f"the state of step {step} is not on disk"
            )
        self._unrecorded.append(step)

    def poll(self) -> None:
        """Record the tables of asynchronous saves that have finished (one process: each step;
        several processes record at the next save, where they meet anyway)."""
        import jax

        if self._unrecorded and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
            self._record()

    def _record(self) -> None:
        """Once the pending saves are complete: record their digest tables, then rotate."""
        if not self._unrecorded:
            return
        self.manager.wait_until_finished()
        if _is_main():
            for step in self._unrecorded:
                layout.write_digests(self.step_dir(step))
        newest = self._unrecorded[-1]
        self._unrecorded = []
        _sync("mugv:checkpoint-digests")
        self._rotate(newest)

    def _rotate(self, newest: int) -> None:
        if self.keep is None or self.keep <= 0:
            return
        found = layout.verify(self.step_dir(newest), files_only=True)
        if found is None or not found.ok:
            log.error(
                "not rotating checkpoints: the new save %s does not match its digest table", self.step_dir(newest)
            )
            return
        for old in self.steps()[: -self.keep]:
            if os.path.isfile(os.path.join(self.step_dir(old), layout.DIGESTS_FILE)):
                self.manager.delete(old)
            else:
                log.info("rotation leaves %s: it has no digest table (not written by this version of mugv)", old)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state):
        items = {
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: ocp.args.JsonRestore(),
            CONFIG: ocp.args.JsonRestore(),
        }
        got = self.manager.restore(step, args=ocp.args.Composite(**items))
        return got[STATE], got[DATA], got[CONFIG]

    def check_compatible(self, step: int, abstract_state, model: dict | None = None, check_config=None) -> None:
        """Raise IncompatibleCheckpoint if `step` holds another model (its config item), another
        state layout (its tree of entries and shapes) than the run's, or a run config that
        `check_config(step_dir, saved run config)` refuses (the LoRA / frozen modules)."""
        step_dir = self.step_dir(step)
        if model is not None:
            saved = (layout.stored_run_config(step_dir) or {}).get(MODEL)
            if saved is not None and saved != model:
                raise IncompatibleCheckpoint(step_dir, "model", saved, model)
        if check_config is not None:
            check_config(step_dir, layout.stored_run_config(step_dir))
        saved_tree = {tuple(k): None for k in layout.state_leaves(os.path.join(step_dir, STATE))}
        want = _key_paths(abstract_state)
        missing, unexpected = sorted(set(want) - set(saved_tree)), sorted(set(saved_tree) - set(want))
        if missing or unexpected:
            show = lambda ks: [".".join(k) for k in ks[:6]] + ([f"… {len(ks) - 6} more"] if len(ks) > 6 else [])  # noqa: E731
            raise IncompatibleCheckpoint(
                step_dir,
                "state layout",
                f"{len(saved_tree)} entries",
                f"{len(want)} entries",
                detail=f"; only in the checkpoint: {show(unexpected)}, only in the run: {show(missing)}",
            )

    def restore_latest(self, abstract_state, model: dict | None = None, check_config=None):
        """(step, state, data_state, config) from the newest usable checkpoint, or None.

        Each step tried is checked against its digest table, then against the run (`model`, the
        state layout: IncompatibleCheckpoint); one that is corrupt or does not load is reported
        loudly and moved aside, and the previous one is tried, so one bad write never loses the
        run and the re-run's save of that step replaces it."""
        for step in reversed(self.steps()):
            try:
                layout.check_digests(self.step_dir(step))
                self.check_compatible(step, abstract_state, model, check_config)
                state, data, config = self.restore(step, abstract_state)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure: report, move aside, try the previous
                self._set_aside(step, e)
                continue
            if layout.read_digests(self.step_dir(step)) is None:
                log.warning(
                    "%s has no digest table (%s): written before checksums, or the run died between "
                    "saving it and recording its table; resumed from it unverified",
                    self.step_dir(step),
                    layout.DIGESTS_FILE,
                )
            return step, state, data, config
        return None

    def _set_aside(self, step: int, e: BaseException) -> None:
        path = self.step_dir(step)
        lines = getattr(e, "problems", None) or (str(e).splitlines()[:1] if str(e) else [])
        log.error(
            "\n%s\nCHECKPOINT UNREADABLE: checkpoint %s is unreadable (%s):\n  %s\nIt is moved aside "
            "(never deleted) and the previous checkpoint is used; this run's next save at that step "
            "takes its place.\n%s",
            "=" * 100,
            path,
            type(e).__name__,
            "\n  ".join(line[:300] for line in lines[:8]),
            "=" * 100,
        )
        _sync("mugv:set-aside-start")
        if _is_main():
            log.warning("moved %s aside to %s", path, quarantine(path))
        _sync("mugv:set-aside-done")
        self.manager.reload()

    def wait(self) -> None:
        self._record()
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def read_config(directory: str, step: int | None = None) -> dict:
    """The run config saved with a checkpoint (no arrays are read)."""
    mgr = ocp.CheckpointManager(os.path.abspath(directory), item_names=TRAINER_ITEMS)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    return mgr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
