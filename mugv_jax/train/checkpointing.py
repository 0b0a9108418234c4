"""Orbax checkpoints of the JAX trainer.

The layout is mugv/io/orbax.py's (the converters and `init_from` read it there):
`<workdir>/checkpoints/<step>/` managed by an orbax CheckpointManager (async, keep-N, atomic: a
step directory appears only when complete), with the items `state` (the train-state pytree:
params, opt_state, ema, null_text, step, rng, nonfinite, skipped; params/ema nested dicts keyed by
the JAX layout's dotted paths, e.g. state["params"]["blocks"]["attn"]["qkv"]["kernel"]), `data`
(the data iterator's JSON state) and `config` (the resolved run config, the model's DiTConfig
under "model"). Restoring takes an abstract target with shardings, so a checkpoint saved on one
mesh restores onto any other mesh or device count.
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

from mugv.io.orbax import CONFIG, DATA, STATE, TRAINER_ITEMS

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=TRAINER_ITEMS)

    def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
        items = {
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data_state),
            CONFIG: ocp.args.JsonSave(config),
        }
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

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

    def restore_latest(self, abstract_state):
        """(step, state, data_state, config) from the newest readable checkpoint, or None.

        An unreadable checkpoint (truncated, corrupted) is skipped with a warning and the previous
        one is tried, so one bad write never loses the run."""
        for step in reversed(self.steps()):
            try:
                state, data, config = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure means "try the previous one"
                log.warning(
                    "checkpoint %s/%d is unreadable (%s: %s); falling back to the previous one",
                    self.directory,
                    step,
                    type(e).__name__,
                    str(e).splitlines()[0][:300],
                )
                continue
            return step, state, data, config
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_config(directory: str, step: int | None = None) -> dict:
    """The run config saved with a checkpoint (no arrays are read)."""
    mgr = ocp.CheckpointManager(os.path.abspath(directory), item_names=TRAINER_ITEMS)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    return mgr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
