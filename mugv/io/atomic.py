"""Outputs that appear complete or not at all: written under a temporary name next to the target
(same directory, so the final rename is atomic), renamed into place when complete, removed on
failure. Every writer of ours that replaces a file or a checkpoint goes through `atomic_output`.

    with atomic_output("out/dit.pt") as tmp:        # refuses an existing out/dit.pt (force=True replaces it)
        write_everything(tmp)
    write_json("run/config.json", resolved)         # replaces the file in one rename
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid


def temp_name(path: str) -> str:
    """The temporary name of an output being written: hidden, in the same directory, and marked
    partial, so an interrupted run leaves nothing that looks like a checkpoint or a result."""
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def check_output_free(path: str, force: bool) -> None:
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"output {path} already exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory {parent} does not exist (for {path})")


def _put_in_place(tmp: str, path: str) -> None:
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
    temporary output is removed.
    """
    path = os.path.abspath(path)
    if make_parent:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    check_output_free(path, force)
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
