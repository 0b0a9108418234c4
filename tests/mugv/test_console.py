"""What a run prints while the user waits (mugv/run/console.py, issue 25 item 8): our lines at
INFO, third-party INFO (orbax logs through absl) only with --verbosity, warnings marked, and
elapsed/ETA on the step line. The journey test checks the same on a real training run."""

import io
import logging

from mugv.run.console import StepClock, clock, setup_logging


def _log_lines(verbosity):
    from absl import logging as absl_logging

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {n: logging.getLogger(n).level for n in ("mugv", "absl")})
    try:
        setup_logging(verbosity, stream=stream)
        absl_logging.info("Closing _NonBlockingMetadataStore(...)")  # what orbax logs per step
        logging.getLogger("orbax.checkpoint").info("Finished saving checkpoint")
        logging.getLogger("mugv.run").info("resumed from ckpt at step 4")
        logging.getLogger("mugv.run").warning("step 5: non-finite loss, update skipped")
        logging.getLogger("jax._src.xla_bridge").warning("An NVIDIA GPU may be present")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    return [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]


def test_third_party_info_is_off_unless_asked_and_warnings_stand_out():
    assert _log_lines(None) == [
        "resumed from ckpt at step 4",
        "WARNING: step 5: non-finite loss, update skipped",
        "WARNING [jax._src.xla_bridge]: An NVIDIA GPU may be present",
    ]
    everything = _log_lines(0)  # --verbosity=0
    assert everything[:2] == ["Closing _NonBlockingMetadataStore(...)", "Finished saving checkpoint"]
    assert len(everything) == 5


def test_step_clock_elapsed_and_eta_leave_the_first_step_out():
    t = [100.0]
    c = StepClock(start_step=0, total=10, now=lambda: t[0])
    t[0] = 130.0  # the first step compiles for 30 s
    c.stepped(1)
    assert c.suffix(1) == "elapsed 0:30"
    t[0] = 134.0  # then 2 s per step
    c.stepped(3)
    assert c.suffix(3) == "elapsed 0:34 | eta 0:14"
    assert clock(3725) == "1:02:05" and clock(59.6) == "1:00"
