"""A readable checkpoint that belongs to another run: refused, never skipped or pruned.

Both trainers resume from `<workdir>/checkpoints`; one whose model, state layout or optimizer
differs from the run's is an error that names both sides and changes nothing (the JAX trainer
once took such a checkpoint for unreadable, trained from random weights and rotated the old
run's steps away).
"""

from __future__ import annotations


def _show(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value[k]!r}" for k in sorted(value)) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def differences(saved: dict, run: dict) -> dict[str, tuple]:
    """{key: (saved, run)} of the keys where two flat dicts differ."""
    return {k: (saved.get(k), run.get(k)) for k in sorted(set(saved) | set(run)) if saved.get(k) != run.get(k)}


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint of another model, state layout or optimizer."""

    def __init__(self, path: str, what: str, saved, run, *, detail: str = ""):
        diff = differences(saved, run) if isinstance(saved, dict) and isinstance(run, dict) else {}
        shown = (
            "; ".join(f"{k}: checkpoint {_show(a)}, run {_show(b)}" for k, (a, b) in diff.items())
            if diff
            else f"checkpoint {_show(saved)}, run {_show(run)}"
        )
        super().__init__(
            f"{path}: checkpoint holds {what} {_show(saved)}, the run's {what} is {_show(run)} ({shown})"
            f"{detail}. It belongs to another run: resume it with its own config, or give this run "
            f"another --workdir (nothing was changed)"
        )
        self.path, self.what, self.saved, self.run = path, what, saved, run


def check_lora(path: str, saved_run_config: dict | None, lora, freeze) -> None:
    """Refuse a checkpoint whose LoRA / frozen modules (the run config it stored) differ from the
    run's `lora` / `freeze` (mugv/lora.py); one that stored no run config is one without LoRA."""
    from mugv.lora import identity, saved_identity

    saved, want = saved_identity(saved_run_config), identity(lora, freeze)
    if saved != want:
        raise IncompatibleCheckpoint(path, "LoRA / frozen modules (--config.lora.*, --config.freeze.*)", saved, want)
