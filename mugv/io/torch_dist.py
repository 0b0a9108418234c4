"""Megatron-Core `torch_dist` checkpoints (dist_checkpointing over PyTorch DCP): the key scheme
both writers use (the Megatron trainer, mugv_megatron/train/checkpointing.py, and the converters)
and the reader, in release names.

    <save dir>/iter_XXXXXXX/{.metadata, *.distcp, common.pt, metadata.json}   (mugv.io.megatron)

Keys (`stored_key`): tensors are stored in their global (un-split, per-head regrouped Megatron)
shapes; a layer's tensor `decoder.layers.<i>.<sub>` is layer i of the stack `decoder.layers.<sub>`
[depth, …] (what Megatron's layer stack saves, so a checkpoint loads under any PP size), other
tensors keep their Megatron names (mugv/layouts/megatron.py). A training checkpoint stores more
state under the same keys behind a prefix: the EMA (`EMA_PREFIX`), Adam's moments and the main
weights (`optimizer_prefix(kind)`), a preference run's reference weights (`REFERENCE_PREFIX`); and
the null caption (`NULL_TEXT_KEY`) and per-rank RNG states (`RNG_KEY`). `common.pt` holds
`mugv.io.megatron.common_state`.

Each chunk of a tensor (one layer, or one TP shard of one, as the trainer's ranks or the
converters saved it) is a `torch.save` archive inside a `.distcp` file; `.metadata` says which
chunks make a tensor and where each archive lies.

Reading does not need a process group: `.metadata` is unpickled with only DCP's own classes
allowed, and a tensor (one layer of a stacked one) whose chunks are plain archives is read
straight from the memory-mapped `.distcp` files (one view when it is a single chunk, else its
chunks copied into place), so any rank of a multi-process run can read. Only chunks stored with
DCP storage transforms go through `dist_checkpointing`'s load, a collective over the default
process group: it runs in a one-process world (made here if there is none, `mugv.io.torch_cpu`)
and is refused, naming the conversion that avoids it, inside a bigger one.

torch (and megatron.core for that fallback) are imported inside the functions that need them.
"""

from __future__ import annotations

import bisect
import collections
import io
import json
import math
import os
import pickle
import threading
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from mugv.io import digest, torch_cpu, torchzip
from mugv.io.atomic import write_text
from mugv.io.base import Entry, from_torch, map_file, numpy_dtype_of_torch
from mugv.io.megatron import MegatronFile, MegatronReader, is_torch_dist_dir, resolve_iteration_dir, stored_config
from mugv.layouts import megatron as layout

EMA_PREFIX = "optimizer.state.exp_moving_avg."
REFERENCE_PREFIX = "optimizer.state.reference_model."
# The trainer's null caption: the Megatron name of the release's (unreleased) y_embedding.
NULL_TEXT_KEY = layout.megatron_name("y_embedder.y_embedding")
RNG_KEY = "rng_state"
COMMON_FILE = "common.pt"
# The iteration's digest table (mugv.io.digest): every file, each .distcp split per stored chunk.
DIGESTS_FILE = "mugv_digests.json"
# Entries that are not model weights (or not release weights): skipped when reading.
_SKIP_PREFIXES = ("optimizer.", RNG_KEY)


# Transformer Engine keeps an `_extra_state` (FP8 metadata) in every TE module, and the official
# ScaleShiftTable one for compatibility (None). The official model built with the TE layer spec
# asks its torch_dist load for these, with the local spec for the core attentions (TE's in both
# specs) and the scale-shift tables; a checkpoint without them fails Megatron-LM's default load
# (`--dist-ckpt-strictness assume_ok_unexpected`). Written as None, which TE's and the
# ScaleShiftTable's `set_extra_state` take as "nothing to restore" (what hf2mcore's `--use-te` writes).
EXTRA_STATE = "._extra_state"
TE_LAYER_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "self_attention.q_layernorm",
    "self_attention.k_layernorm",
    "cross_attention.linear_q",
    "cross_attention.linear_kv",
    "cross_attention.core_attention",
    "cross_attention.linear_proj",
    "cross_attention.q_layernorm",
    "cross_attention.k_layernorm",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
    "scale_shift_table",
)
LOCAL_LAYER_MODULES = ("self_attention.core_attention", "cross_attention.core_attention", "scale_shift_table")
FINAL_LAYER_MODULES = ("final_layer.scale_shift_table",)


def extra_state_objects(depth: int, layers, *, final_layer: bool, replica_id=0) -> dict:
    """{key: ShardedObject} of the `_extra_state` placeholders of the TE layer spec (a superset of
    the local spec's) for the given global layer indices (and the final layer's): a layer's at
    offset (layer,) of shape (depth,), as megatron's `make_sharded_object_for_checkpoint` keys a
    stacked layer's, the final layer's at (0,) of (1,)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    for layer in layers:
        for module in TE_LAYER_MODULES:
            key = layout.LAYER_PREFIX + module + EXTRA_STATE
            out[f"{key}/{layer}"] = ShardedObject(key, None, (depth,), (layer,), replica_id=replica_id)
    if final_layer:
        for module in FINAL_LAYER_MODULES:
            out[module + EXTRA_STATE] = ShardedObject(module + EXTRA_STATE, None, (1,), (0,), replica_id=replica_id)
    return out


# ---------------------------------------------------------------------------------------------
# The official trainer's EMA layout (docs/reference.md §4.7; what its convertor/ema_restore.py reads)
#
# The official trainer keeps the EMA as a state of megatron's distributed optimizer saved
# `fully_sharded_model_space`: each rank's shard of a parameter flattened, which megatron's
# torch_dist strategy stores under the "N-D flattened" global shape: the stack axis (layers),
# then how many shards each axis of a layer's tensor is cut into, then the elements of one shard.
# So a column-parallel weight [L, R, C] at TP t is [L, t, 1, R/t·C], a row-parallel one
# [L, 1, t, R·C/t], a replicated one [L, 1, 1, R·C], a layer's vector [L, t or 1, N/(t or 1)],
# a tensor outside the layers [1, …, 1, numel]; a 1-D tensor outside the layers keeps its shape
# (megatron stores 1-D flattened tensors as they are).


def official_ema_fragments(megatron_name: str, per_layer_shape: tuple, tp: int) -> tuple[int, ...]:
    """Shards per axis of one layer's (or a non-layer) tensor under TP `tp` (the split rule)."""
    frags = [1] * len(per_layer_shape)
    rule = layout.tp_split_rule(megatron_name)
    if rule != "replicated" and tp > 1:
        frags[0 if rule == "column" else 1] = tp
    return tuple(frags)


def to_official_ema(array: np.ndarray, frags: tuple[int, ...], stacked: bool) -> np.ndarray:
    """A tensor (the stack's layers first when `stacked`) in the official layout."""
    lead = array.shape[:1] if stacked else ()
    shape = array.shape[len(lead) :]
    if not stacked and len(shape) == 1:
        return array
    local = [d // f for d, f in zip(shape, frags)]
    split = array.reshape(*lead, *(x for f, l in zip(frags, local) for x in (f, l)))
    k = len(shape)
    order = [*range(len(lead)), *(len(lead) + 2 * i for i in range(k)), *(len(lead) + 2 * i + 1 for i in range(k))]
    return np.ascontiguousarray(split.transpose(order)).reshape(*lead, *frags, math.prod(local))


def from_official_ema(stored: np.ndarray, shape: tuple[int, ...], stacked: bool) -> np.ndarray:
    """The inverse of `to_official_ema`: a stored EMA tensor back in the weight's `shape` (layers
    first when `stacked`; `stored` may hold any number of whole layers)."""
    lead = stored.shape[:1] if stacked else ()
    per = tuple(shape[1:] if stacked else shape)
    if not stacked and len(per) == 1:
        return stored.reshape(per)
    frags = tuple(stored.shape[len(lead) : -1])
    fits = len(frags) == len(per) and not any(d % f for d, f in zip(per, frags))
    if not fits or stored.shape[-1] * math.prod(frags) != math.prod(per):
        raise ValueError(f"an EMA stored as {list(stored.shape)} is not the official layout of a {list(shape)} weight")
    local = [d // f for d, f in zip(per, frags)]
    k, n = len(per), len(lead)
    grid = stored.reshape(*lead, *frags, *local)
    order = [*range(n), *(x for i in range(k) for x in (n + i, n + k + i))]
    return np.ascontiguousarray(grid.transpose(order)).reshape(*lead, *per)


def is_official_ema(ema_shape: tuple, weight_shape: tuple) -> bool:
    """Whether an EMA stored as `ema_shape` is in the official layout of a `weight_shape` weight
    (ours stores the weight's own shape)."""
    return tuple(ema_shape) != tuple(weight_shape) and math.prod(ema_shape) == math.prod(weight_shape)


def optimizer_prefix(kind: str) -> str:
    """The prefix of the optimizer state `kind` (exp_avg, exp_avg_sq, param) of every weight."""
    return f"optimizer.state.{kind}."


def stored_key(name: str, prefix: str = "") -> tuple[str, int | None]:
    """(DCP key, layer or None) under which the Megatron tensor `name` (of the state `prefix`
    names) is stored: a layer's tensor at its index of the stack, other tensors under their name."""
    layer, suffix = layout.split_layer(name)
    return prefix + (name if layer is None else layout.LAYER_PREFIX + suffix), layer


def is_skipped(key: str) -> bool:
    """Whether a checkpoint entry is not a release weight (optimizer state, RNG, TE extra
    state, the trainer's null caption)."""
    return key.startswith(_SKIP_PREFIXES) or "_extra_state" in key or key == NULL_TEXT_KEY


# Only these may appear in a torch_dist `.metadata`, which torch reads with plain pickle.
_DCP_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataCheck(pickle.Unpickler):
    def find_class(self, module, name):
        import torch

        if (
            module.startswith(_DCP_MODULES)
            or (module, name) in _DCP_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_metadata(ckpt_dir: str):
    """The checkpoint's DCP metadata, unpickled with only DCP's own classes allowed."""
    path = os.path.join(ckpt_dir, ".metadata")
    with open(path, "rb") as f:
        try:
            return _MetadataCheck(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise ValueError(
                f"{path}: refusing to read torch_dist metadata ({e}); it may only "
                f"hold torch.distributed.checkpoint metadata objects"
            ) from e


def digest_parts(ckpt_dir: str) -> dict[str, list[digest.Part]]:
    """{file: [(start, end, tensor)]}: where each stored chunk's archive lies, from `.metadata`
    (a tensor stored in several chunks, e.g. one per layer, is named with the chunk's offset)."""
    storage = getattr(read_metadata(ckpt_dir), "storage_data", {})
    chunks = collections.Counter(index.fqn for index in storage)
    parts: dict[str, list] = {}
    for index, info in storage.items():
        label = index.fqn
        if chunks[index.fqn] > 1:
            label += f" [chunk at {list(index.offset or ())}]"
        start = int(info.offset)
        parts.setdefault(info.relative_path, []).append((start, start + int(info.length), label))
    return parts


def digest_files(ckpt_dir: str) -> list[str]:
    return digest.all_files(ckpt_dir, exclude=lambda rel: rel == DIGESTS_FILE)


def compute_digests(ckpt_dir: str, files: list[str] | None = None, *, workers: int | None = None) -> dict:
    """The digest table of an iteration directory (of `files` only, when several processes share
    the work: `digest.merge` their tables)."""
    files = digest_files(ckpt_dir) if files is None else files
    return digest.compute(ckpt_dir, files, digest_parts(ckpt_dir), workers=workers or digest.default_workers())


def write_digests(ckpt_dir: str, table: dict | None = None) -> dict:
    """Record the table in the iteration directory (computed here unless given); call once the
    iteration is complete, before it is published."""
    table = compute_digests(ckpt_dir) if table is None else table
    write_text(os.path.join(ckpt_dir, DIGESTS_FILE), digest.dumps(table))
    return table


def read_digests(ckpt_dir: str) -> dict | None:
    """The iteration's digest table, None when it has none (written before checksums, or not by
    mugv); an unreadable table is corruption."""
    path = os.path.join(ckpt_dir, DIGESTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return digest.loads(f.read().decode("utf-8", "replace"), path)


def verify(ckpt_dir: str, *, select=lambda i, rel: True, files_only: bool = False) -> digest.Check | None:
    """Every byte of the iteration against its digest table (the files `select` picks); None when
    it has no table."""
    table = read_digests(ckpt_dir)
    if table is None:
        return None
    return digest.check(ckpt_dir, table, select=select, workers=digest.default_workers(), files_only=files_only)


# A chunk of a stored tensor: (offsets, sizes, (file, byte offset, length) of its plain archive,
# or None when its record is transformed or missing).
_Chunk = tuple


class _Chunks:
    """The chunks of one stored tensor, sorted by their offset along the first axis (a stacked
    tensor has one or more per layer), to find those of one layer without a scan."""

    def __init__(self, chunks: list[_Chunk]):
        self.chunks = sorted(chunks, key=lambda c: c[0][:1])
        self.starts = [c[0][0] if c[0] else 0 for c in self.chunks]
        # No chunk reaches back further than the longest one.
        self.reach = max((c[1][0] if c[1] else 1) for c in self.chunks)

    def covering(self, offsets: tuple, sizes: tuple) -> list[_Chunk] | None:
        """The chunks that overlap the region, when plain archives cover it exactly; else None."""
        if not sizes:  # a scalar: one chunk
            return [c for c in self.chunks if c[2] is not None][:1] or None
        lo = bisect.bisect_right(self.starts, offsets[0] - self.reach)
        hi = bisect.bisect_left(self.starts, offsets[0] + sizes[0])
        out, covered = [], 0
        for chunk in self.chunks[lo:hi]:
            co, cs, record = chunk
            extent = [min(a + n, b + m) - max(a, b) for a, n, b, m in zip(co, cs, offsets, sizes)]
            if any(e <= 0 for e in extent):
                continue
            if record is None:
                return None
            out.append(chunk)
            covered += math.prod(extent)
        return out if covered == math.prod(sizes) else None


def _chunk_table(metadata, directory: str) -> dict[str, _Chunks]:
    """Every stored tensor's chunks and where their archives lie."""
    records = {}
    for index, info in getattr(metadata, "storage_data", {}).items():
        if index.offset is None:  # a non-tensor entry (bytes)
            continue
        plain = not getattr(info, "transform_descriptors", None)
        records[(index.fqn, tuple(index.offset))] = (
            (os.path.join(directory, info.relative_path), int(info.offset), int(info.length)) if plain else None
        )
    out = {}
    for key, meta in getattr(metadata, "state_dict_metadata", {}).items():
        chunks = [
            (tuple(c.offsets), tuple(c.sizes), records.get((key, tuple(c.offsets))))
            for c in getattr(meta, "chunks", ())
        ]
        if chunks:
            out[key] = _Chunks(chunks)
    return out


class TorchDistReader(MegatronReader):
    format = "megatron"

    def __init__(self, path: str, iteration: int | None = None, weights: str = "raw"):
        """weights: "raw" (the model weights) or "ema" (the Megatron trainer's EMA, stored as
        `optimizer.state.exp_moving_avg.<megatron name>` with the same stacking)."""
        if weights not in ("raw", "ema"):
            raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
        self.path, self.weights = path, weights
        self.dir, self.iteration = resolve_iteration_dir(path, iteration, is_torch_dist_dir)
        # Metadata and common.pt are checked before they are parsed; each archive when read.
        self._record_crcs = self._check_small_files()
        with open(os.path.join(self.dir, "metadata.json")) as f:
            backend = json.load(f).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{self.dir}: sharded backend {backend!r}, only 'torch_dist' is supported")
        metadata = read_metadata(self.dir)
        # DCP key → (global shape, torch dtype), for the tensors (not the pickled objects).
        self._tensors = {
            k: (tuple(m.size), m.properties.dtype)
            for k, m in metadata.state_dict_metadata.items()
            if hasattr(m, "chunks") and hasattr(m, "size")
        }
        if weights == "ema":
            # The EMA entries read as the weights; everything else (the raw weights too) is skipped.
            chosen = {k[len(EMA_PREFIX) :]: k for k in self._tensors if k.startswith(EMA_PREFIX)}
            if not chosen:
                raise ValueError(
                    f"{self.dir}: --weights ema needs a Megatron training checkpoint "
                    f"with an EMA ({EMA_PREFIX}<name> entries); this one has none"
                )
        else:
            chosen = {k: k for k in self._tensors if not is_skipped(k)}
        self.skipped = sorted(set(self._tensors) - set(chosen.values()))
        # release name → (Megatron name, DCP key, layer or None, depth of the stack, per-layer
        # shape, torch dtype)
        self._src: dict[str, tuple] = {}
        self._layer_cache: tuple = (None, {})
        self._entries: dict[str, Entry] = {}
        # release name → the weight's shape (one layer's), for EMA entries stored in the official
        # layout (`from_official_ema` turns what is read back into it).
        self._official: dict[str, tuple] = {}
        for name, key in chosen.items():
            shape, dtype = self._tensors[key]
            weight_shape = self._tensors[name][0] if name in self._tensors else shape
            official = key != name and is_official_ema(shape, weight_shape)
            if name.startswith(layout.LAYER_PREFIX):
                sub = name[len(layout.LAYER_PREFIX) :]
                for i in range(shape[0]):
                    added = self._add(layout.layer_name(i, sub), (key, i, shape[0], shape[1:], dtype))
                    if official:
                        self._decode_as(added, weight_shape[1:], dtype)
            else:
                added = self._add(name, (key, None, None, shape, dtype))
                if official:
                    self._decode_as(added, weight_shape, dtype)
        self.stored_config = None
        common = os.path.join(self.dir, COMMON_FILE)
        if os.path.isfile(common):
            # Megatron-LM's common.pt holds its `args` (with enums), optimizer and scheduler state:
            # read without running pickled code, only our `mugv` entry is used. One torch cannot
            # read either leaves the config to be detected from the tensor shapes.
            try:
                self.stored_config = stored_config(MegatronFile(common).obj)
            except ValueError:
                self.stored_config = None
        self._lock = threading.Lock()
        self._maps: dict[str, object] = {}
        self._strategy = None
        self._chunks = _chunk_table(metadata, self.dir)
        self._direct = self._direct_index()

    def _check_small_files(self) -> dict[tuple[str, int, int], int]:
        """Check the files that are not tensor data (metadata, common.pt) against the digest
        table now; return each archive's recorded CRC, checked when it is read."""
        table = read_digests(self.dir)
        if table is None:
            return {}
        small = {rel: w for rel, w in table["files"].items() if "parts" not in w}
        found = digest.check(self.dir, {"algorithm": table["algorithm"], "files": small})
        if not found.ok:
            raise digest.CorruptCheckpoint(self.dir, found.problems)
        return {
            (os.path.join(self.dir, rel), start, end): crc
            for rel, w in table["files"].items()
            for start, end, crc, _ in w.get("parts", ())
        }

    def _add(self, mname: str, src: tuple) -> None:
        try:
            name = layout.release_name(mname)
        except KeyError:
            name = mname  # reported as unexpected by the strict schema check
        self._src[name] = (mname, *src)
        self._entries[name] = Entry(src[3], numpy_dtype_of_torch(src[4]))
        return name

    def _decode_as(self, name: str, shape: tuple, dtype) -> None:
        self._official[name] = tuple(shape)
        self._entries[name] = Entry(shape, numpy_dtype_of_torch(dtype))

    def _as_weight(self, name: str, stored: np.ndarray) -> np.ndarray:
        """A tensor as read (one layer of a stack, or whole) in the weight's shape."""
        shape = self._official.get(name)
        if shape is None:
            return stored
        stacked = self._src[name][2] is not None
        if stacked:
            return from_official_ema(stored[None], (1, *shape), True)[0]
        return from_official_ema(stored, shape, False)

    @staticmethod
    def _region(layer: int | None, shape: tuple) -> tuple[tuple, tuple]:
        """(offsets, sizes) in the stored tensor of one layer of a stack, or of a whole tensor."""
        if layer is None:
            return (0,) * len(shape), tuple(shape)
        return (layer,) + (0,) * len(shape), (1, *shape)

    def _covering(self, key: str, layer: int | None, shape: tuple) -> list[_Chunk] | None:
        return self._chunks[key].covering(*self._region(layer, shape)) if key in self._chunks else None

    def _direct_index(self) -> dict[str, list[_Chunk]]:
        """The chunks of each tensor (one layer of a stacked one) that plain archives cover, for
        the tensors read from the mapped .distcp files: all of them in the converters' outputs
        and in trainer saves at any TP/PP; the rest go through dist_checkpointing."""
        out = {}
        for name, (_, key, layer, _, shape, _) in self._src.items():
            pieces = self._covering(key, layer, shape)
            if pieces is not None:
                out[name] = pieces
        return out

    # --- the mapped read ------------------------------------------------------------------------

    def _archive(self, record: tuple[str, int, int], sizes: tuple, dtype: np.dtype, what: str) -> np.ndarray:
        """The tensor of one chunk's archive (a view of the mapped file where it can be)."""
        path, offset, length = record
        with self._lock:
            if path not in self._maps:
                self._maps[path] = map_file(path)
        mapping = self._maps[path]
        want = self._record_crcs.get((path, offset, offset + length))
        if want is not None and digest.crc32(memoryview(mapping)[offset : offset + length]) != want:
            raise digest.CorruptCheckpoint(
                self.dir, [f"{path}: tensor {what} (bytes {offset}-{offset + length}) changed"]
            )
        try:
            archive = torchzip.TorchZipFile(path, offset, length, mapping)
            if not isinstance(archive.obj, torchzip.TensorRef):
                raise ValueError(
                    f"{path}: the record of tensor {what} at byte {offset} holds a "
                    f"{type(archive.obj).__name__}, not a tensor"
                )
            array = archive.array(archive.obj, what)
        except torchzip.NeedsTorch:
            # A variant the parser does not take: torch reads the record, as DCP itself would.
            import torch

            tensor = torch.load(io.BytesIO(mapping[offset : offset + length]), map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"{path}: the record of tensor {what} at byte {offset} holds a "
                    f"{type(tensor).__name__}, not a tensor"
                ) from None
            array = from_torch(tensor)
        if array.size != math.prod(sizes) or array.dtype != dtype:
            raise ValueError(
                f"{path}: a chunk of tensor {what} is stored as {list(array.shape)} "
                f"{array.dtype}, the metadata says {list(sizes)} {dtype}"
            )
        return array.reshape(sizes)

    def _read_region(
        self, pieces: list[_Chunk], offsets: tuple, sizes: tuple, dtype: np.dtype, what: str
    ) -> np.ndarray:
        if len(pieces) == 1 and pieces[0][0] == offsets and pieces[0][1] == sizes:
            return self._archive(pieces[0][2], sizes, dtype, what)
        out = np.empty(sizes, dtype)
        for co, cs, record in pieces:
            chunk = self._archive(record, cs, dtype, what)
            lo = [max(a, b) for a, b in zip(co, offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(co, cs, offsets, sizes)]
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = chunk[
                tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, co))
            ]
        return out

    def _read_direct(self, name: str) -> np.ndarray:
        mname, key, layer, _, shape, _ = self._src[name]
        raw = self._read_region(self._direct[name], *self._region(layer, shape), self._entries[name].dtype, name)
        weight = self._as_weight(name, raw.reshape(shape))
        ((_, out),) = layout.megatron_to_release(mname, weight, self._config_for_layout())
        return np.ascontiguousarray(out)

    def read_stored(self, key: str) -> np.ndarray | None:
        """The tensor stored under DCP key `key` as it is stored (no layout change), or None when
        the checkpoint has none."""
        if key not in self._tensors:
            return None
        shape, dtype = self._tensors[key]
        pieces = self._covering(key, None, shape)
        if pieces is not None:
            return self._read_region(pieces, *self._region(None, shape), numpy_dtype_of_torch(dtype), key)
        with self._lock:
            return self._load_dcp({key: (key, None, None, shape, dtype)})[key]

    def null_text(self) -> tuple[np.ndarray, str] | None:
        null = self.read_stored(NULL_TEXT_KEY)
        return None if null is None else (np.asarray(null, np.float32), f"megatron:{self.dir} {NULL_TEXT_KEY}")

    # --- dist_checkpointing, for transformed chunks ----------------------------------------------

    def _load(self, names: list[str]) -> dict[str, np.ndarray]:
        # dist_checkpointing is not thread-safe; the pipeline may call this from its threads.
        with self._lock:
            raw = self._load_dcp({name: self._src[name][1:] for name in names})
        out = {}
        for name in names:
            weight = self._as_weight(name, raw[name])
            ((_, array),) = layout.megatron_to_release(self._src[name][0], weight, self._config_for_layout())
            out[name] = np.ascontiguousarray(array)
        return out

    def _load_dcp(self, requests: dict[str, tuple]) -> dict[str, np.ndarray]:
        """{name: stored array (one layer of a stack)} for {name: (DCP key, layer or None, depth,
        per-layer shape, torch dtype)}, through dist_checkpointing's load."""
        world = torch_cpu.world_size()
        if world > 1:
            first = next(iter(requests))
            spec = f"megatron:{self.path}" + (f"@{self.iteration}" if isinstance(self.iteration, int) else "")
            ema = " --weights ema" if self.weights == "ema" else ""
            raise RuntimeError(
                f"{self.dir}: tensor {first} is stored with DCP storage transforms, which only "
                f"dist_checkpointing reads, and its load is a collective that the other "
                f"{world - 1} processes of this run do not join. Convert the checkpoint in one "
                f"process first: python -m converters convert --src {spec}{ema} "
                f"--dst release:OUT.safetensors, and start from OUT.safetensors"
            )
        import torch
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

        torch_cpu.one_process_group(f"reading {self.dir} through dist_checkpointing")
        if self._strategy is None:
            self._strategy = TorchDistLoadShardedStrategy()
        sd = {}
        for name, (key, layer, depth, shape, dtype) in requests.items():
            if layer is None:
                sd[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
            else:
                sd[name] = ShardedTensor.from_rank_offsets(
                    key, torch.empty((1, *shape), dtype=dtype), (0, layer, depth), replica_id=0
                )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = self._strategy.load(sd, Path(self.dir))
        return {
            name: from_torch(loaded[name][0] if requests[name][1] is not None else loaded[name]) for name in requests
        }

    # --- the Reader contract --------------------------------------------------------------------

    def integrity(self) -> digest.Check | None:
        return verify(self.dir)

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def get(self, name: str) -> np.ndarray:
        if name not in self._src:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        if name in self._direct:
            return self._read_direct(name)
        # Each strategy.load call costs a pass over the checkpoint's metadata, so a caller that
        # walks release names (verify, layer by layer) would pay it per tensor: load the whole
        # layer on first touch and keep that one layer (bounded memory: one layer).
        layer = self._src[name][2]
        if layer is None:
            return self._load([name])[name]
        if self._layer_cache[0] != layer:
            self._layer_cache = (None, {})
            names = [n for n, src in self._src.items() if src[2] == layer and n not in self._direct]
            self._layer_cache = (layer, self._load(names))
        return self._layer_cache[1][name]

    def _by_layer(self) -> list[list[str]]:
        by_layer: dict = {}
        for name, src in self._src.items():
            by_layer.setdefault(src[2], []).append(name)
        return [by_layer[k] for k in [None] + sorted(k for k in by_layer if k is not None) if k in by_layer]

    def jobs(self) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        # Mapped reads run on the caller's threads; the rest is loaded a layer at a time here.
        for names in self._by_layer():
            rest = [n for n in names if n not in self._direct]
            loaded = self._load(rest) if rest else {}
            for name in names:
                if name in loaded:
                    yield name, (lambda a=loaded.pop(name): a)  # noqa: B008 -- bind this tensor now
                else:
                    yield name, partial(self._read_direct, name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name, read in self.jobs():
            yield name, read()

    def describe(self) -> dict:
        through_dcp = len(self._src) - len(self._direct)
        read = (
            "memory-mapped chunks"
            if not through_dcp
            else "dist_checkpointing"
            if not self._direct
            else f"memory-mapped chunks, dist_checkpointing for {through_dcp} tensors"
        )
        return {
            "variant": "torch_dist",
            "directory": self.dir,
            "iteration": self.iteration,
            "weights": self.weights,
            "skipped entries": len(self.skipped),
            "read": read,
        }
