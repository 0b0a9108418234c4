"""What a run shows while the user waits: our log lines at INFO, third-party INFO (orbax and absl
log every checkpoint step; jax, grain, tfds, megatron) only when `--verbosity` asks for it,
warnings that stand out, and elapsed time and ETA on the step line.

    setup_logging()            # ours at INFO, the rest at WARNING
    setup_logging(0)           # --verbosity=0: everything at INFO (1: DEBUG)
"""

from __future__ import annotations

import logging
import sys
import time

OURS = ("mugv", "mugv_jax", "mugv_megatron", "mugv_data", "converters", "main_job")


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS message`; warnings and errors as `HH:MM:SS WARNING: message`, with the logger's
    name when it is not ours, so they stand out among progress lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno < logging.WARNING:
            return f"{stamp} {message}"
        origin = "" if record.name.split(".")[0] in OURS else f" [{record.name}]"
        return f"{stamp} {record.levelname}{origin}: {message}"


def setup_logging(verbosity: int | None = None, stream=None) -> None:
    """One stderr handler on the root logger (replacing absl's and any earlier one). `verbosity`
    is absl's (-1 warning, 0 info, 1 debug): None keeps third-party loggers at WARNING."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(ConsoleFormatter())
    root.addHandler(handler)
    level = logging.WARNING if verbosity is None else absl_logging.converter.absl_to_standard(verbosity)
    root.setLevel(level)
    # absl's own logger (what orbax logs through) follows the root.
    logging.getLogger("absl").setLevel(logging.NOTSET)
    for name in OURS:
        logging.getLogger(name).setLevel(min(level, logging.INFO))


def verbosity_flag() -> int | None:
    """absl's --verbosity when it was given on the command line, else None."""
    from absl import flags

    flag = flags.FLAGS["verbosity"]
    return int(flag.value) if flag.present else None


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class StepClock:
    """Elapsed time since the run (or resume) started, and the ETA of the remaining steps at the
    rate measured since the first step finished (its compile would skew it)."""

    def __init__(self, start_step: int, total: int, now=time.perf_counter):
        self.now, self.total = now, total
        self.started = now()
        self.first: tuple[int, float] | None = None  # (step, time) when the first step finished
        self.start_step = start_step

    def stepped(self, step: int) -> None:
        if self.first is None:
            self.first = (step, self.now())

    def suffix(self, step: int) -> str:
        t = self.now()
        parts = [f"elapsed {clock(t - self.started)}"]
        if self.first is not None and step > self.first[0]:
            rate = (t - self.first[1]) / (step - self.first[0])
            parts.append(f"eta {clock(rate * (self.total - step))}")
        return " | ".join(parts)
