"""SIGTERM is a request to save and stop, whoever sends it and whenever it comes.

Slurm, `timeout`, docker and Kubernetes send SIGTERM to the whole process group, then SIGKILL
after a grace period. So:

* `install()` runs first thing in the trainers' `__main__` (before jax / torch are imported): a
  SIGTERM during start-up is remembered instead of killing the process with 143, and the run
  loop exits 0 before its first step, having written nothing (`mugv.run.driver`).
* Helper processes the save depends on must outlive the group's SIGTERM: `helpers_ignore_sigterm()`
  around their start makes them inherit an ignored SIGTERM (a spawned process keeps ignored
  signals across exec; handlers are reset), and `helper_init` (their initializer, where there is
  one) also ties them to their parent's life, so a SIGKILLed trainer leaves none behind.
"""

from __future__ import annotations

import contextlib
import os
import signal

_state = {"signal": None, "installed": False}


def _handler(signum, frame):
    _state["signal"] = signum


def install() -> None:
    """Remember SIGTERM instead of dying of it (idempotent)."""
    if not _state["installed"]:
        signal.signal(signal.SIGTERM, _handler)
        _state["installed"] = True


def requested() -> bool:
    return _state["signal"] is not None


def reset() -> None:
    _state["signal"] = None


@contextlib.contextmanager
def handling():
    """SIGTERM remembered for the duration (the previous handler restored after)."""
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def helpers_ignore_sigterm():
    """Processes started inside ignore SIGTERM. A SIGTERM for this process that arrives meanwhile
    is held back and handled after, not lost."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    # Ignoring a pending signal would discard it: note it first, re-raise it after.
    pending = signal.SIGTERM in signal.sigpending()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if pending:
            os.kill(os.getpid(), signal.SIGTERM)


def helper_init() -> None:
    """Initializer of a helper process: ignore SIGTERM, and die with the parent (Linux)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)
