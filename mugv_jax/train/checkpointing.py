"""Orbax checkpoints of the JAX trainer.

Layout (the converters read it too): `<workdir>/checkpoints/<step>/` managed by an orbax
CheckpointManager (async, keep-N, atomic: a step directory appears only when complete), with
three items per step:
  state   the train-state pytree (StandardSave): params, opt_state, ema, null_text, step, rng,
          nonfinite, skipped. params/ema are nested dicts keyed by the JAX layout's dotted paths
          (mugv/layouts/jax.py), e.g. state["params"]["blocks"]["attn"]["qkv"]["kernel"].
  data    the data iterator's JSON state (position)
  config  the resolved run config as JSON, with the model's DiTConfig under "model"
Restoring takes an abstract target with shardings, so a checkpoint saved on one mesh restores onto
any other mesh or device count.
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)
            ),
            force=force,
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state):
        got = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return got["state"], got["data"], got["config"]

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
    mgr = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data", "config"))
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    return mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
