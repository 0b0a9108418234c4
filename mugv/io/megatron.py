"""Megatron save directories: the names both variants share (docs/reference.md §4.6).

    <save dir>/latest_checkpointed_iteration.txt     the newest complete iteration ("release" or N)
    <save dir>/iter_XXXXXXX/                         one iteration, holding either
        .metadata, *.distcp, common.pt, metadata.json       torch_dist (mugv.io.torch_dist)
        mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt      legacy per-rank files (converters)

Both trainers and the converters name, find and publish iterations through these helpers; what
is inside an iteration belongs to the variant's own module.
"""

from __future__ import annotations

import os
import re

from mugv.config import DiTConfig
from mugv.io.atomic import write_text
from mugv.io.base import Reader

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
_ITER_DIR = re.compile(r"^iter_(\d+)$")

# An iteration the Megatron trainer is still writing: renamed to iter_XXXXXXX when complete.
PARTIAL_SUFFIX = ".tmp"

LEGACY_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?$")


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def iter_dir(save_dir: str, iteration: int | str) -> str:
    return os.path.join(save_dir, iter_dir_name(iteration))


def iteration_of(name: str) -> int | None:
    """N of an `iter_XXXXXXX` directory name, None for any other name (a partial one included)."""
    m = _ITER_DIR.match(name)
    return int(m.group(1)) if m else None


def is_partial_iter_dir(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIX) and iteration_of(name[: -len(PARTIAL_SUFFIX)]) is not None


def iterations(save_dir: str) -> list[int]:
    """The iterations present under a save directory, ascending."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(i for i in map(iteration_of, os.listdir(save_dir)) if i is not None)


def read_tracker(save_dir: str) -> int | str | None:
    """The iteration the tracker names ("release" or N), None without a tracker."""
    path = os.path.join(save_dir, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return "release" if text == "release" else int(text)


def write_tracker(save_dir: str, iteration: int) -> None:
    """Name `iteration` the newest (one rename: a reader sees the old or the new tracker)."""
    write_text(os.path.join(save_dir, TRACKER), str(iteration))


def is_torch_dist_dir(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "metadata.json")) and os.path.isfile(os.path.join(d, ".metadata"))


def is_legacy_dir(d: str) -> bool:
    return os.path.isdir(d) and any(_RANK_DIR.match(n) for n in os.listdir(d))


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_dirs(iteration_dir: str) -> dict[tuple[int, int], str]:
    """{(TP rank, PP rank): directory} of a legacy iteration directory."""
    out = {}
    for n in os.listdir(iteration_dir):
        m = _RANK_DIR.match(n)
        if m:
            out[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(iteration_dir, n)
    return out


def resolve_iteration_dir(path: str, iteration: int | None, marker) -> tuple[str, int | str]:
    """The iter_XXXXXXX directory of a save directory (via the tracker, or `iteration`), or
    `path` itself when `marker(path)` says it already is one."""
    if marker(path):
        base = os.path.basename(os.path.normpath(path))
        n = iteration_of(base)
        return path, (n if n is not None else base)
    if iteration is None:
        iteration = read_tracker(path)
        if iteration is None:
            raise FileNotFoundError(f"{path}: not a Megatron checkpoint (no {TRACKER}, and not an iteration directory)")
    d = iter_dir(path, iteration)
    if not marker(d):
        raise FileNotFoundError(f"{path}: iteration {iteration} has no checkpoint at {d}")
    return d, iteration


def detect_variant(path: str) -> str:
    """'torch_dist' or 'legacy' for a save directory or an iteration directory."""
    candidates = [path]
    tracked = read_tracker(path)
    if tracked is not None:
        candidates.append(iter_dir(path, tracked))
    for d in candidates:
        if is_torch_dist_dir(d):
            return "torch_dist"
        if is_legacy_dir(d):
            return "legacy"
    raise FileNotFoundError(f"{path}: neither a torch_dist nor a legacy Megatron checkpoint")


def stored_config(state) -> DiTConfig | None:
    """The model config our writers store in `common.pt` / a legacy rank file (`{"mugv":
    {"model": …}}`), None when the state holds none."""
    mugv = state.get("mugv") if isinstance(state, dict) else None
    model = mugv.get("model") if isinstance(mugv, dict) else None
    return DiTConfig.from_dict(model) if model else None


def common_state(config: DiTConfig, iteration: int) -> dict:
    """The non-tensor entries every checkpoint of ours carries (Megatron reads `iteration` and
    `checkpoint_version`; `mugv.model` is the config readers take instead of detecting it)."""
    return {"mugv": {"model": config.to_dict()}, "iteration": iteration, "checkpoint_version": CHECKPOINT_VERSION}


class MegatronReader(Reader):
    """What the Megatron readers share (torch_dist and the converters' legacy reader): the config
    the per-head regroup needs (heads and head dim), as set by the caller (`layout_config`), else
    the checkpoint's stored config, else detected from the shapes."""

    stored_config: DiTConfig | None = None
    layout_config: DiTConfig | None = None
    dir = ""  # the iteration directory read

    @property
    def location(self) -> str:
        return self.dir

    def _config_for_layout(self) -> DiTConfig:
        if self.layout_config is None:
            from mugv.schema import detect_config

            self.layout_config = self.stored_config or detect_config(self.entries())
        return self.layout_config
