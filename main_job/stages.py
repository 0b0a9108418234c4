"""Stage bookkeeping: a stage is done when `<workdir>/<stage>/DONE.json` exists.

Stages write into their directory and write DONE.json last (atomically), so an interrupted stage
is simply not done: the next run repeats it (or, for the trainers, resumes from their own
checkpoints, which live in that directory). Redoing a stage also redoes every later one, because
their inputs change.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence

from mugv.io.atomic import write_json

MARKER = "DONE.json"


class Stages:
    def __init__(self, workdir: str, order: Sequence[str], redo: Iterable[str] = ()):
        self.workdir = workdir
        self.order = list(order)
        redo = [r for r in redo if r]
        unknown = sorted(set(redo) - set(self.order))
        if unknown:
            raise ValueError(f"--redo: unknown stage(s) {unknown}; stages are {','.join(self.order)}")
        first = min((self.order.index(r) for r in redo), default=len(self.order))
        self.redo = set(self.order[first:])

    def dir(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def done(self, name: str) -> dict | None:
        """The stage's recorded result, or None if it must run (not done, or asked to redo)."""
        if name in self.redo:
            return None
        path = os.path.join(self.dir(name), MARKER)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def start(self, name: str, *, keep_partial: bool) -> str:
        """Prepare the stage directory. A redo wipes it; `keep_partial` keeps an unfinished
        stage's files (trainer checkpoints to resume from), otherwise they are removed."""
        d = self.dir(name)
        if name in self.redo or not keep_partial:
            shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d, exist_ok=True)
        self.redo.discard(name)
        return d

    def finish(self, name: str, result: dict) -> dict:
        write_json(os.path.join(self.dir(name), MARKER), result, default=str)
        return result
