"""Outputs that appear complete or not at all: written under a temporary name next to the target
(same directory, so the final rename is atomic), renamed into place when complete, removed on
failure. Every writer of ours that replaces a file or a checkpoint goes through `atomic_output`.
What it publishes has the mode the umask gives a new file, whatever the writer used.

    with atomic_output("out/dit.pt") as tmp:        # refuses an existing out/dit.pt (force=True replaces it)
        write_everything(tmp)
    write_json("run/config.json", resolved)         # replaces the file in one rename
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import uuid

log = logging.getLogger("mugv.io")

# .NAME.partial-HOST-PID-TAG[.staging|.old|…]: HOST and PID say who is writing it, so a later run
# can tell a dead writer's leftover from a live one's output.
_PARTIAL = re.compile(
    r"^\.(?P<base>.+)\.partial-(?:(?P<host>.+)-)?(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})(?P<rest>(?:\..*)?)$"
)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"


def temp_name(path: str) -> str:
    """The temporary name of an output being written: hidden, in the same directory, marked
    partial and naming this host and process, so an interrupted run leaves nothing that looks like
    a checkpoint or a result, and the next run can remove what a dead one left."""
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.partial-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_partials(path: str) -> list[str]:
    """Remove the partial outputs of `path` (and their staging) left by processes of this host
    that are gone; returns what was removed, and says so. Those of live processes, of other hosts
    or of unknown ones (named before hosts were recorded) are left where they are."""
    parent, base = os.path.split(os.path.abspath(path))
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return removed
    host = _host()
    for name in sorted(names):
        m = _PARTIAL.match(name)
        if not m or m.group("base") != base:
            continue
        full, pid = os.path.join(parent, name), int(m.group("pid"))
        if m.group("host") is None:
            log.warning("left %s: a partial output of an earlier run whose host is not recorded in its name", full)
            continue
        if m.group("host") != host or pid == os.getpid() or _alive(pid):
            continue
        remove_path(full)
        removed.append(full)
        log.warning("removed %s: a partial output of process %d on %s, which is gone", full, pid, host)
    return removed


UNREADABLE = ".unreadable-"


def quarantine(path: str) -> str:
    """Move an unreadable output aside (`PATH.unreadable-YYYYmmdd-HHMMSS`) instead of deleting
    it: the next write may take its name, and whoever wants to look at it still can. Readers
    take no such name for a checkpoint. Returns the new name."""
    import time

    new = f"{os.path.normpath(path)}{UNREADABLE}{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.lexists(new):
        new += "_"
    os.rename(path, new)
    return new


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def check_output_free(path: str, force: bool, *, make_parent: bool = False) -> None:
    """Refuse an existing `path` (unless `force`) and, unless `make_parent`, a missing parent."""
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"output {path} already exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(f"output {path}: {parent} is not a directory")
    if not make_parent and not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory {parent} does not exist (for {path})")


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(path: str) -> None:
    """Files under `path` get the mode a plain `open` gives (0o666 less the umask, execute bits
    kept): some writers (safetensors' save_file, mkstemp) make them 0600, which other users of a
    shared checkpoint directory then cannot read."""
    want = 0o666 & ~current_umask()
    files = [path] if not os.path.isdir(path) else [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]
    for f in files:
        st = os.lstat(f)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o666 != want:
            os.chmod(f, want | (stat.S_IMODE(st.st_mode) & 0o111 & ~current_umask()))


def _put_in_place(tmp: str, path: str) -> None:
    give_umask_mode(tmp)
    if os.path.lexists(path) and (os.path.isdir(path) or os.path.isdir(tmp)):
        # No single rename replaces a directory: the old one steps aside first.
        old = temp_name(path) + ".old"
        os.rename(path, old)
        os.rename(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output(path: str, *, force: bool = False, make_parent: bool = False):
    """Yield a temporary path (file or directory, as the caller makes it) next to `path`; on
    success rename it to `path`.

    An existing `path` is refused unless `force`, and then replaced only after the new output is
    complete. A missing parent directory is an error unless `make_parent`. On any failure the
    temporary output is removed; partial outputs of `path` that dead processes of this host left
    are removed first (`remove_stale_partials`).
    """
    path = os.path.abspath(path)
    if make_parent:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    check_output_free(path, force)
    remove_stale_partials(path)
    tmp = temp_name(path)
    try:
        yield tmp
        _put_in_place(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_text(path: str, text: str) -> str:
    """Replace `path` with `text` in one rename; returns `path`."""
    with atomic_output(path, force=True) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def write_json(path: str, obj, *, indent: int | None = 2, default=None) -> str:
    """Replace `path` with `obj` as JSON in one rename; returns `path`. `default` as in `json.dump`."""
    with atomic_output(path, force=True) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, default=default)
    return path
