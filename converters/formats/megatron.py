"""Megatron-Core checkpoints: `torch_dist` (dist_checkpointing) and the legacy per-rank files.

Both sit in a save directory with `latest_checkpointed_iteration.txt` and `iter_XXXXXXX/`
(docs/reference.md §4.6); names and per-head regrouping come from converters/layouts/megatron.py.

torch_dist (`iter_XXXXXXX/{.metadata, __0_0.distcp, common.pt, metadata.json}`): written and read
with `megatron.core.dist_checkpointing` in one process. Layer tensors are stacked as
`decoder.layers.<sub>` [depth, …], each layer saved as its own chunk (the shape Megatron's layer
stack saves), non-layer tensors under their plain names, all full (un-split) tensors; TP/PP do
not change it. Reading loads one layer per call (DCP reads only the chunks that overlap it).
Writing stages the tensors on disk first because DCP saves a whole state dict in one call; the
staged files are memory-mapped into that call, so the data goes file → page cache → file.

Legacy (`iter_XXXXXXX/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`, each `{"model": {…}}`):
column-parallel tensors cut along dim 0, row-parallel along dim 1 (after the per-head regroup),
layers split evenly over PP stages with stage-local indices; x_embedder and the start/end tokens
on the first stage, final_layer on the last, the t/fps/caption embedders on every stage
(docs/reference.md §4.2). Written with `torchzip` (no whole state dict in memory), read with
`torch.load(weights_only=True, mmap=True)`.
"""
from __future__ import annotations

import os
import pickle
import re
import threading
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from converters.formats.staging import RawStore
from mugv.io.base import (Entry, Reader, Writer, file_backed, from_torch, map_file,
                          numpy_dtype_of_torch, to_torch, torch_dtype_of)
from mugv.io import torchzip
from mugv.layouts import megatron as layout
from mugv.config import DiTConfig

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
DEFAULT_ITERATION = 1
# Entries that are not model weights (or not release weights): skipped when reading.
_SKIP_PREFIXES = ("optimizer.", "rng_state")
_NULL_CAPTION = "context_embedder.drop_emb"
# The Megatron trainer's EMA of the weights (mugv_megatron/train/checkpointing.py).
EMA_PREFIX = "optimizer.state.exp_moving_avg."
_LAYER = re.compile(r"^" + re.escape(layout.LAYER_PREFIX) + r"(\d+)\.(.+)$")
_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?$")


def _is_skipped(key: str) -> bool:
    return key.startswith(_SKIP_PREFIXES) or "_extra_state" in key or key == _NULL_CAPTION


def _split_layer(name: str) -> tuple[int | None, str]:
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def check_parallel(config: DiTConfig, tp: int, pp: int) -> None:
    """TP must give every rank whole heads and an even MLP split; PP an even layer split."""
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"TP and PP must be >= 1 (got TP {tp}, PP {pp})")
    else:
        if config.num_heads % tp:
            problems.append(f"TP {tp} does not divide {config.num_heads} attention heads")
        if config.mlp_hidden_size % tp:
            problems.append(f"TP {tp} does not divide the MLP width {config.mlp_hidden_size}")
        if config.depth % pp:
            problems.append(f"PP {pp} does not divide {config.depth} layers evenly")
    if problems:
        raise ValueError("cannot lay out the model for Megatron: " + "; ".join(problems))


def resolve_iteration_dir(path: str, iteration: int | None, marker) -> tuple[str, int | str]:
    """The iter_XXXXXXX directory of a save directory (via the tracker, or `iteration`), or
    `path` itself when `marker(path)` says it already is one."""
    if marker(path):
        base = os.path.basename(os.path.normpath(path))
        m = re.match(r"^iter_(\d+)$", base)
        return path, (int(m.group(1)) if m else base)
    if iteration is None:
        tracker = os.path.join(path, TRACKER)
        if not os.path.isfile(tracker):
            raise FileNotFoundError(f"{path}: not a Megatron checkpoint (no {TRACKER}, and not an "
                                    f"iteration directory)")
        text = open(tracker).read().strip()
        iteration = "release" if text == "release" else int(text)
    d = os.path.join(path, iter_dir_name(iteration))
    if not marker(d):
        raise FileNotFoundError(f"{path}: iteration {iteration} has no checkpoint at {d}")
    return d, iteration


def is_torch_dist_dir(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "metadata.json")) and os.path.isfile(os.path.join(d, ".metadata"))


def is_legacy_dir(d: str) -> bool:
    return os.path.isdir(d) and any(_RANK_DIR.match(n) for n in os.listdir(d))


def detect_variant(path: str) -> str:
    """'torch_dist' or 'legacy' for a save directory or an iteration directory."""
    candidates = [path]
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        candidates.append(os.path.join(path, iter_dir_name("release" if text == "release" else int(text))))
    for d in candidates:
        if is_torch_dist_dir(d):
            return "torch_dist"
        if is_legacy_dir(d):
            return "legacy"
    raise FileNotFoundError(f"{path}: neither a torch_dist nor a legacy Megatron checkpoint")


def _stage_of(release_name: str, config: DiTConfig, pp: int) -> list[tuple[int, str]]:
    """(PP stage, stage-local Megatron name) of every copy of a release tensor."""
    mname = layout.megatron_name(release_name)
    layer, suffix = _split_layer(mname)
    if layer is not None:
        per = config.depth // pp
        return [(layer // per, f"{layout.LAYER_PREFIX}{layer % per}.{suffix}")]
    if mname.startswith(("x_embedder.", "start_token", "end_token")):
        return [(0, mname)]
    if mname.startswith("final_layer."):
        return [(pp - 1, mname)]
    return [(s, mname) for s in range(pp)]


def _ensure_process_group() -> None:
    """dist_checkpointing needs torch.distributed: a one-process gloo group unless one exists."""
    import torch.distributed as dist
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("the converters save/load torch_dist from a single process; "
                               f"this process is in a world of {dist.get_world_size()}")
        return
    from mugv_megatron.parallel import cpu_shim
    from mugv_megatron.parallel import state as parallel
    cpu_shim.apply()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{parallel.free_port()}",
                            rank=0, world_size=1)


# Only these may appear in a torch_dist `.metadata`, which torch reads with plain pickle.
_DCP_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataCheck(pickle.Unpickler):
    def find_class(self, module, name):
        import torch
        if (module.startswith(_DCP_MODULES) or (module, name) in _DCP_GLOBALS
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _check_dcp_metadata(ckpt_dir: str):
    """The checkpoint's DCP metadata, unpickled with only DCP's own classes allowed."""
    path = os.path.join(ckpt_dir, ".metadata")
    with open(path, "rb") as f:
        try:
            return _MetadataCheck(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise ValueError(f"{path}: refusing to read torch_dist metadata ({e}); it may only "
                             f"hold torch.distributed.checkpoint metadata objects") from e


# ---------------------------------------------------------------------------------------------
# torch_dist


class _MegatronReader(Reader):
    """What both Megatron readers share: the config the per-head regroup needs (heads and head
    dim), from the checkpoint's stored config or else detected from the shapes."""
    stored_config: DiTConfig | None = None

    def _config_for_layout(self) -> DiTConfig:
        if getattr(self, "layout_config", None) is None:
            from mugv.schema import detect_config
            self.layout_config = self.stored_config or detect_config(self.entries())
        return self.layout_config


class TorchDistReader(_MegatronReader):
    format = "megatron"

    def __init__(self, path: str, iteration: int | None = None, weights: str = "raw"):
        """weights: "raw" (the model weights) or "ema" (the Megatron trainer's EMA, stored as
        `optimizer.state.exp_moving_avg.<megatron name>` with the same stacking)."""
        import json
        if weights not in ("raw", "ema"):
            raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
        self.path, self.weights = path, weights
        self.dir, self.iteration = resolve_iteration_dir(path, iteration, is_torch_dist_dir)
        with open(os.path.join(self.dir, "metadata.json")) as f:
            backend = json.load(f).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{self.dir}: sharded backend {backend!r}, only 'torch_dist' is supported")
        dcp_metadata = _check_dcp_metadata(self.dir)
        _ensure_process_group()
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
        self._strategy = TorchDistLoadShardedStrategy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = self._strategy.load_tensors_metadata(Path(self.dir))
        if weights == "ema":
            # The EMA entries read as the weights; everything else (the raw weights too) is skipped.
            chosen = {k[len(EMA_PREFIX):]: k for k in meta if k.startswith(EMA_PREFIX)}
            if not chosen:
                raise ValueError(f"{self.dir}: --weights ema needs a Megatron training checkpoint "
                                 f"with an EMA ({EMA_PREFIX}<name> entries); this one has none")
        else:
            chosen = {k: k for k in meta if not _is_skipped(k)}
        self.skipped = sorted(set(meta) - set(chosen.values()))
        # release name → (DCP key, layer or None, depth of the stack, per-layer shape, torch dtype)
        self._src: dict[str, tuple] = {}
        self._layer_cache: tuple = (None, {})
        self._entries: dict[str, Entry] = {}
        for name, key in chosen.items():
            st = meta[key]
            shape, dtype = tuple(st.global_shape), st.dtype
            if name.startswith(layout.LAYER_PREFIX):
                sub = name[len(layout.LAYER_PREFIX):]
                for i in range(shape[0]):
                    self._add(f"{layout.LAYER_PREFIX}{i}.{sub}", (key, i, shape[0], shape[1:], dtype))
            else:
                self._add(name, (key, None, None, shape, dtype))
        self.stored_config = None
        common = os.path.join(self.dir, "common.pt")
        if os.path.isfile(common):
            try:
                state = torchzip.load_torch_file(common, allow_namespace=True)
            except ValueError:
                # A trainer's common.pt may hold objects outside the weights-only allowlist; the
                # config is then detected from the tensor shapes.
                state = {}
            cfg = state.get("mugv", {}).get("model") if isinstance(state, dict) else None
            if cfg:
                self.stored_config = DiTConfig.from_dict(cfg)
        self._lock = threading.Lock()
        self._maps: dict[str, object] = {}
        self._direct = self._direct_index(dcp_metadata)

    def _add(self, mname: str, src: tuple) -> None:
        try:
            name = layout.release_name(mname)
        except KeyError:
            name = mname  # reported as unexpected by the strict schema check
        self._src[name] = (mname, *src)
        self._entries[name] = Entry(src[3], numpy_dtype_of_torch(src[4]))

    def _direct_index(self, metadata) -> dict[str, tuple[str, int, int]] | None:
        """(file, offset, length) of the archive that holds each tensor, when every tensor (one
        layer of a stacked one) is stored as one whole chunk without storage transforms, as the
        converters and a one-rank save write them. Such chunks are read straight from the
        memory-mapped .distcp files; otherwise (other chunkings) dist_checkpointing loads them."""
        storage, chunks = {}, {}
        for index, info in getattr(metadata, "storage_data", {}).items():
            if getattr(info, "transform_descriptors", None):
                return None
            if index.offset is not None:  # None: a non-tensor entry (bytes)
                storage[(index.fqn, tuple(index.offset))] = info
        for key, meta in getattr(metadata, "state_dict_metadata", {}).items():
            for c in getattr(meta, "chunks", ()):
                chunks[(key, tuple(c.offsets))] = tuple(c.sizes)
        out = {}
        for name, (_, key, layer, _, shape, _) in self._src.items():
            offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * len(shape)
            sizes = tuple(shape) if layer is None else (1, *shape)
            info = storage.get((key, offsets))
            if info is None or chunks.get((key, offsets)) != sizes:
                return None
            out[name] = (os.path.join(self.dir, info.relative_path), int(info.offset), int(info.length))
        return out

    def _read_direct(self, name: str) -> np.ndarray:
        mname, _, layer, _, shape, _ = self._src[name]
        path, offset, length = self._direct[name]
        with self._lock:
            if path not in self._maps:
                self._maps[path] = map_file(path)
        try:
            archive = torchzip.TorchZipFile(path, offset, length, self._maps[path])
        except torchzip.NeedsTorch:
            return self._load([name])[name]
        if not isinstance(archive.obj, torchzip.TensorRef):
            raise ValueError(f"{path}: the record of tensor {name} at byte {offset} holds a "
                             f"{type(archive.obj).__name__}, not a tensor")
        array = archive.array(archive.obj, name)
        entry = self._entries[name]
        if array.size != int(np.prod(entry.shape, dtype=np.int64)) or array.dtype != entry.dtype:
            raise ValueError(f"{path}: tensor {name} is stored as {list(array.shape)} "
                             f"{array.dtype}, the metadata says {list(entry.shape)} {entry.dtype}")
        ((_, out),) = layout.megatron_to_release(mname, array.reshape(entry.shape), self._config_for_layout())
        return np.ascontiguousarray(out)

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def _load(self, names: list[str]) -> dict[str, np.ndarray]:
        # dist_checkpointing is not thread-safe; the pipeline may call this from its threads.
        with self._lock:
            return self._load_dcp(names)

    def _load_dcp(self, names: list[str]) -> dict[str, np.ndarray]:
        import torch
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        sd = {}
        for name in names:
            _, key, layer, depth, shape, dtype = self._src[name]
            if layer is None:
                sd[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
            else:
                sd[name] = ShardedTensor.from_rank_offsets(
                    key, torch.empty((1, *shape), dtype=dtype), (0, layer, depth), replica_id=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = self._strategy.load(sd, Path(self.dir))
        out = {}
        for name in names:
            mname, _, layer, *_ = self._src[name]
            t = loaded[name][0] if layer is not None else loaded[name]
            ((_, array),) = layout.megatron_to_release(mname, from_torch(t), self._config_for_layout())
            out[name] = np.ascontiguousarray(array)
        return out

    def get(self, name: str) -> np.ndarray:
        if name not in self._src:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        # Each strategy.load call costs a pass over the checkpoint's metadata, so a caller that
        # walks release names (verify, layer by layer) would pay it per tensor: load the whole
        # layer on first touch and keep that one layer (bounded memory: one layer).
        if self._direct is not None:
            return self._read_direct(name)
        layer = self._src[name][2]
        if layer is None:
            return self._load([name])[name]
        if self._layer_cache[0] != layer:
            self._layer_cache = (None, {})
            names = [n for n, src in self._src.items() if src[2] == layer]
            self._layer_cache = (layer, self._load(names))
        return self._layer_cache[1][name]

    def _by_layer(self) -> list[list[str]]:
        by_layer: dict = {}
        for name, src in self._src.items():
            by_layer.setdefault(src[2], []).append(name)
        return [by_layer[k] for k in [None] + sorted(k for k in by_layer if k is not None) if k in by_layer]

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for names in self._by_layer():
            if self._direct is not None:
                for name in names:
                    yield name, self._read_direct(name)
            else:
                yield from self._load(names).items()

    def jobs(self) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        if self._direct is None:
            yield from super().jobs()
            return
        for names in self._by_layer():
            for name in names:
                yield name, partial(self._read_direct, name)

    def describe(self) -> dict:
        return {"variant": "torch_dist", "directory": self.dir, "iteration": self.iteration,
                "weights": self.weights, "skipped entries": len(self.skipped),
                "read": "memory-mapped chunks" if self._direct is not None else "dist_checkpointing"}


class TorchDistWriter(Writer):
    format = "megatron"

    def __init__(self, target: str, tmp: str, config: DiTConfig, entries: dict[str, Entry], *,
                 tp: int = 1, pp: int = 1, iteration: int = DEFAULT_ITERATION, write_processes: int = 1):
        super().__init__(target, config, entries)
        check_parallel(config, tp, pp)
        self.tmp, self.iteration = tmp, iteration
        self.write_processes = max(1, write_processes)
        os.makedirs(tmp)
        self.iter_dir = os.path.join(tmp, iter_dir_name(iteration))
        os.makedirs(self.iter_dir)
        self.staging = RawStore(os.path.join(tmp, ".staging"))
        _ensure_process_group()

    def _write(self, name: str, array: np.ndarray) -> None:
        for mname, marr in layout.release_to_megatron(name, array, self.config):
            if file_backed(marr) and marr.flags.c_contiguous:
                # Same bytes as the mapped source (no regroup, no cast): DCP writes from there.
                self.staging.keep(mname, marr)
            else:
                self.staging.create(mname, marr.shape, marr.dtype)
                self.staging.write(mname, np.ascontiguousarray(marr))

    def finish(self) -> None:
        import torch
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
        depth = self.config.depth
        sd: dict = {}
        for mname in list(self.staging._arrays):
            entry = self.staging.entry(mname)
            # The storage of each tensor is exactly the tensor (its own staging file, or
            # from_numpy of a view), so dist_checkpointing writes it without a copy.
            if self.staging.file(mname) is None:
                t = to_torch(self.staging.read(mname))
            else:
                t = torch.from_file(self.staging.file(mname), shared=False,
                                    size=int(np.prod(entry.shape, dtype=np.int64)),
                                    dtype=torch_dtype_of(entry.dtype)).view(entry.shape)
            layer, suffix = _split_layer(mname)
            if layer is None:
                sd[mname] = ShardedTensor.from_rank_offsets(mname, t, replica_id=0)
            else:
                sd[mname] = ShardedTensor.from_rank_offsets(
                    layout.LAYER_PREFIX + suffix, t.view(1, *entry.shape), (0, layer, depth), replica_id=0)
        sd["mugv"] = {"model": self.config.to_dict()}
        sd["iteration"] = self.iteration
        sd["checkpoint_version"] = CHECKPOINT_VERSION
        # Each tensor goes into the .distcp files as a torch.save archive; their CRC32s cost a
        # pass over every byte and torch.load does not check them.
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # thread_count: the writer forks that many processes, each writing one file.
                dist_checkpointing.save(sd, self.iter_dir, sharded_strategy=TorchDistSaveShardedStrategy(
                    "torch_dist", 1, thread_count=self.write_processes))
        finally:
            torch.serialization.set_crc32_options(crc)
        del sd
        self.staging.close()
        with open(os.path.join(self.tmp, TRACKER), "w") as f:
            f.write(str(self.iteration))

    def abort(self) -> None:
        self.staging.close()


# ---------------------------------------------------------------------------------------------
# Legacy per-rank files


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _concat(arrays, axis):
    return np.concatenate(arrays, axis=axis)


class LegacyReader(_MegatronReader):
    format = "megatron"

    def __init__(self, path: str, iteration: int | None = None):
        self.path = path
        self.dir, self.iteration = resolve_iteration_dir(path, iteration, is_legacy_dir)
        ranks = {}
        for n in os.listdir(self.dir):
            m = _RANK_DIR.match(n)
            if m:
                ranks[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(self.dir, n)
        self.tp = 1 + max(t for t, _ in ranks)
        self.pp = 1 + max(p for _, p in ranks)
        missing = [(t, p) for t in range(self.tp) for p in range(self.pp) if (t, p) not in ranks]
        if missing:
            raise ValueError(f"{self.dir}: incomplete legacy checkpoint, no directory for "
                             f"(TP rank, PP rank) {missing} of a TP {self.tp} x PP {self.pp} grid")
        self._models: dict[tuple[int, int], dict] = {}
        self.files = {}
        self.stored_config = None
        for (t, p), d in sorted(ranks.items()):
            f = os.path.join(d, "model_optim_rng.pt")
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{d}: no model_optim_rng.pt")
            state = torchzip.load_torch_file(f, allow_namespace=True)
            if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
                keys = list(state)[:8] if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"{f}: expected a dict with a 'model' state dict (keys: {keys}); "
                                 f"virtual-pipeline checkpoints (model0, model1, …) are not supported")
            self._models[(t, p)] = state["model"]
            self.files[(t, p)] = f
            cfg = state.get("mugv", {}).get("model") if isinstance(state.get("mugv"), dict) else None
            if cfg and self.stored_config is None:
                self.stored_config = DiTConfig.from_dict(cfg)
        # Stage-local layer indices → global: stages hold consecutive layers.
        offsets, total = [], 0
        for p in range(self.pp):
            offsets.append(total)
            layers = {_split_layer(k)[0] for k in self._models[(0, p)]} - {None}
            total += (max(layers) + 1) if layers else 0
        self.depth = total
        # release name → (PP stage, stage-local Megatron name, global Megatron name)
        self._src: dict[str, tuple[int, str, str]] = {}
        self._entries: dict[str, Entry] = {}
        self.skipped = []
        import torch
        for p in range(self.pp):
            for local, value in self._models[(0, p)].items():
                if _is_skipped(local):
                    self.skipped.append(local)
                    continue
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{self.files[(0, p)]}: model entry {local!r} is a "
                                     f"{type(value).__name__}, not a tensor")
                layer, suffix = _split_layer(local)
                gname = local if layer is None else f"{layout.LAYER_PREFIX}{layer + offsets[p]}.{suffix}"
                try:
                    name = layout.release_name(gname)
                except KeyError:
                    name = gname
                if name in self._src:
                    continue  # an embedder replicated on every stage: the first copy is used
                shape = list(value.shape)
                rule = layout.tp_split_rule(gname)
                if rule != "replicated":
                    shape[0 if rule == "column" else 1] *= self.tp
                self._src[name] = (p, local, gname)
                self._entries[name] = Entry(shape, numpy_dtype_of_torch(value.dtype))

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def get(self, name: str) -> np.ndarray:
        if name not in self._src:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        p, local, gname = self._src[name]
        shards = []
        for t in range(self.tp):
            value = self._models[(t, p)].get(local)
            if value is None:
                raise ValueError(f"{self.files[(t, p)]}: tensor {local} is missing on TP rank {t} "
                                 f"(present on rank 0)")
            shards.append(from_torch(value))
        full = layout.tp_merge(gname, shards, _concat)
        want = self._entries[name].shape
        if tuple(full.shape) != want:
            raise ValueError(f"{self.dir}: tensor {gname} merges to {list(full.shape)} over TP "
                             f"{self.tp}, expected {list(want)}")
        ((_, array),) = layout.megatron_to_release(gname, full, self._config_for_layout())
        return np.ascontiguousarray(array)

    def describe(self) -> dict:
        return {"variant": "legacy", "directory": self.dir, "iteration": self.iteration,
                "tp": self.tp, "pp": self.pp, "layers": self.depth, "skipped entries": len(self.skipped)}


class LegacyWriter(Writer):
    format = "megatron-legacy"

    def __init__(self, target: str, tmp: str, config: DiTConfig, entries: dict[str, Entry], *,
                 tp: int = 1, pp: int = 1, iteration: int = DEFAULT_ITERATION):
        super().__init__(target, config, entries)
        check_parallel(config, tp, pp)
        self.tp, self.pp, self.tmp, self.iteration = tp, pp, tmp, iteration
        it_dir = os.path.join(tmp, iter_dir_name(iteration))
        # (TP rank, PP stage) → {stage-local Megatron name: slot}
        slots: dict[tuple[int, int], dict] = {(t, p): {} for t in range(tp) for p in range(pp)}
        self._route: dict[str, list[tuple[int, str]]] = {}
        for name, e in self.entries.items():
            mname = layout.megatron_name(name)
            # A zero-strided stand-in gives each rank's shard shape without allocating.
            stand_in = np.lib.stride_tricks.as_strided(np.zeros((), e.dtype), e.shape, (0,) * len(e.shape))
            self._route[name] = _stage_of(name, config, pp)
            for p, local in self._route[name]:
                for t in range(tp):
                    shard = layout.tp_shard(mname, stand_in, t, tp)
                    key = str(len(slots[(t, p)]))
                    slots[(t, p)][local] = torchzip.TensorSlot(key, Entry(shard.shape, e.dtype))
        self._files: dict[tuple[int, int], torchzip.StreamingTorchFile] = {}
        for (t, p), rank_slots in slots.items():
            d = os.path.join(it_dir, rank_dir_name(t, p, pp))
            os.makedirs(d)
            obj = {"model": rank_slots, "checkpoint_version": CHECKPOINT_VERSION,
                   "iteration": iteration, "mugv": {"model": config.to_dict()}}
            self._files[(t, p)] = torchzip.StreamingTorchFile(
                os.path.join(d, "model_optim_rng.pt"), obj, list(rank_slots.values()))
        self._slots = slots

    def _write(self, name: str, array: np.ndarray) -> None:
        ((mname, marr),) = layout.release_to_megatron(name, array, self.config)
        for p, local in self._route[name]:
            for t in range(self.tp):
                shard = np.ascontiguousarray(layout.tp_shard(mname, marr, t, self.tp))
                self._files[(t, p)].write(self._slots[(t, p)][local].key, shard)

    def finish(self) -> None:
        for f in self._files.values():
            f.close()
        with open(os.path.join(self.tmp, TRACKER), "w") as f:
            f.write(str(self.iteration))

    def abort(self) -> None:
        for f in self._files.values():
            f.abort()
