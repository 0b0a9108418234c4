"""Checksums of what we write, checked on read: the digest tables every format owner keeps.

A table is recorded when an output is complete and names every file of it (path relative to the
output, size, CRC-32), optionally split into labelled byte ranges (a torch_dist `.distcp` file
into one range per stored tensor chunk), so a changed byte is reported with the file and the
tensor it falls in:

    {"algorithm": "crc32", "files": {"__0_0.distcp": {"size": 81920, "crc32": 305419896,
                                                      "parts": [[0, 4096, 51, "x_embedder.proj.weight"], …]}}}

Where each format keeps its table (a JSON file in the checkpoint, an entry of its own metadata)
belongs to its owner in mugv/io; this module only computes and compares. CRC-32 is zlib's (about
2.5 GB/s per core on the 2-core test VM; docs/benchmarks.md), computed on `workers` threads
(zlib releases the GIL on large buffers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

ALGORITHM = "crc32"
_BLOCK = 16 * 2**20

# (start, end, label) of a labelled byte range of a file.
Part = tuple[int, int, str]


class CorruptCheckpoint(ValueError):
    """Bytes that differ from what was written: never used silently."""

    def __init__(self, location: str, problems: list[str]):
        shown = problems[:8] + ([f"… {len(problems) - 8} more"] if len(problems) > 8 else [])
        super().__init__(f"{location} is corrupt (checksums recorded at write differ):\n  " + "\n  ".join(shown))
        self.location, self.problems = location, problems


def crc32(data, value: int = 0) -> int:
    return zlib.crc32(data, value) & 0xFFFFFFFF


def crc_range(path: str, start: int = 0, end: int | None = None) -> int:
    """CRC-32 of bytes [start, end) of a file (to its end when `end` is None)."""
    value = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            block = f.read(_BLOCK if left is None else min(_BLOCK, left))
            if not block:
                break
            value = zlib.crc32(block, value)
            if left is not None:
                left -= len(block)
    return value & 0xFFFFFFFF


def _file_entry(path: str, parts: list[Part] | None) -> dict:
    size = os.path.getsize(path)
    entry: dict = {"size": size}
    if not parts:
        entry[ALGORITHM] = crc_range(path)
        return entry
    # One pass over the file: each labelled range, and the whole file's CRC combined from them.
    ranges, at = [], 0
    for start, end, label in sorted(parts):
        if start > at:
            ranges.append((at, start, None))
        ranges.append((start, end, label))
        at = max(at, end)
    if at < size:
        ranges.append((at, size, None))
    whole, out = 0, []
    with open(path, "rb") as f:
        for start, end, label in ranges:
            f.seek(start)
            value, left = 0, end - start
            while left > 0:
                block = f.read(min(_BLOCK, left))
                if not block:
                    break
                value = zlib.crc32(block, value)
                whole = zlib.crc32(block, whole)
                left -= len(block)
            if label is not None:
                out.append([start, end, value & 0xFFFFFFFF, label])
    entry[ALGORITHM] = whole & 0xFFFFFFFF
    entry["parts"] = out
    return entry


def compute(root: str, files: Iterable[str], parts: dict[str, list[Part]] | None = None, *, workers: int = 4) -> dict:
    """The table of `files` (paths relative to `root`), each split into `parts[file]` when given."""
    files = sorted(files)
    parts = parts or {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        entries = list(pool.map(lambda rel: _file_entry(os.path.join(root, rel), parts.get(rel)), files))
    return {"algorithm": ALGORITHM, "files": dict(zip(files, entries))}


_SEAL = "table_crc32"


def _canonical(table: dict) -> bytes:
    return json.dumps({k: v for k, v in table.items() if k != _SEAL}, sort_keys=True, separators=(",", ":")).encode()


def dumps(table: dict) -> str:
    """The table as JSON, sealed with its own CRC so that a changed table is noticed too."""
    return json.dumps({**table, _SEAL: crc32(_canonical(table))})


def loads(text: str, where: str) -> dict:
    """A table written by `dumps`; CorruptCheckpoint if it is unreadable or was changed."""
    try:
        table = json.loads(text)
        table["files"]  # noqa: B018 -- a table without files is not one
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(where, [f"{where}: unreadable digest table ({e})"]) from None
    if table.get(_SEAL) != crc32(_canonical(table)):
        raise CorruptCheckpoint(where, [f"{where}: the digest table itself changed"])
    return table


def merge(tables: Iterable[dict]) -> dict:
    """One table from tables of disjoint file sets (computed by several processes)."""
    files: dict = {}
    for t in tables:
        files.update(t["files"])
    return {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}


def all_files(root: str, *, exclude: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """Every regular file under `root`, relative to it."""
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            if not exclude(rel):
                out.append(rel)
    return sorted(out)


@dataclasses.dataclass
class Check:
    """What `check` found: problems (each names the file, and the tensor where the table knows
    it) and how many bytes were read."""

    problems: list[str]
    bytes_checked: int

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_file(root: str, rel: str, want: dict, *, files_only: bool = False) -> list[str]:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        return [f"{path}: missing (recorded at write: {want['size']} bytes)"]
    size = os.path.getsize(path)
    if size != want["size"]:
        return [f"{path}: {size} bytes, {want['size']} recorded at write (truncated or overwritten)"]
    if files_only:
        return []
    if "parts" not in want:
        got = crc_range(path)
        return [] if got == want[ALGORITHM] else [f"{path}: {ALGORITHM} {got:08x}, {want[ALGORITHM]:08x} recorded"]
    got = _file_entry(path, [(s, e, label) for s, e, _, label in want["parts"]])
    if got[ALGORITHM] == want[ALGORITHM]:
        return []
    bad = [
        f"{path}: tensor {label} (bytes {s}-{e}) changed"
        for (s, e, c, label), (_, _, c2, _) in zip(want["parts"], got["parts"])
        if c != c2
    ]
    return bad or [f"{path}: bytes outside its tensors changed (headers or padding)"]


def check(
    root: str,
    table: dict,
    *,
    select: Callable[[int, str], bool] = lambda i, rel: True,
    workers: int = 4,
    files_only: bool = False,
) -> Check:
    """Compare the files under `root` with `table` (`select(i, file)` picks which of them this
    caller checks: several processes can share the work); `files_only` checks presence and sizes
    without reading."""
    if table.get("algorithm") != ALGORITHM:
        known = f"{root}: digest table of algorithm {table.get('algorithm')!r}, this reader knows {ALGORITHM}"
        return Check([known], 0)
    mine = [(rel, want) for i, (rel, want) in enumerate(sorted(table["files"].items())) if select(i, rel)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = list(pool.map(lambda kv: _check_file(root, *kv, files_only=files_only), mine))
    return Check([p for ps in found for p in ps], 0 if files_only else sum(w["size"] for _, w in mine))


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
