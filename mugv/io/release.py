"""The official release layout: a flat {name: tensor} as one `.pt`, one `.safetensors`, or shards
with a Hugging Face index (`model.safetensors.index.json` / `pytorch_model.bin.index.json`).

`ReleaseReader` is the one reader of release checkpoints (both backends' loaders and the
converters use it): every file is memory-mapped and each tensor is a numpy view of the mapping,
so nothing is read until a tensor is used, one tensor at a time, and what was read is page cache
rather than this process's memory. Safetensors are parsed here (an 8-byte header length, a JSON
header, the raw bytes); `.pt` files by `torchzip.TorchZipFile` without torch, falling back to
torch's weights-only `torch.load` for variants it does not parse. Writing is streaming too:
the layout is fixed from the entries up front and each tensor lands with a positioned write.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Iterator

import numpy as np

from mugv.config import DiTConfig
from mugv.io import digest, torchzip
from mugv.io.base import (
    BF16,
    Entry,
    Reader,
    Writer,
    from_torch,
    map_file,
    mapped_array,
    numpy_dtype_of_torch,
    pwrite_all,
)
from mugv.vae_config import VAEConfig

ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
INDEX_SUFFIX = ".index.json"
# Our safetensors carry the model config as JSON under this metadata key (a VAE's its VAEConfig
# under the other).
CONFIG_METADATA = "mugv_config"
VAE_CONFIG_METADATA = "mugv_vae_config"
# ... and each tensor's CRC-32 (8 hex digits per tensor, in header order) under this one.
DIGESTS_METADATA = "mugv_crc32"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": BF16,
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# A header bigger than this is not a safetensors header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 2**20


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def kind_of(path: str) -> str:
    """'safetensors' or 'torch' for a single file (by suffix), else 'sharded': a directory of
    shards, named by the directory or by its index json."""
    if path.endswith(INDEX_SUFFIX):
        return "sharded"
    if os.path.isfile(path):
        return "safetensors" if path.endswith(".safetensors") else "torch"
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(TORCH_SUFFIXES):
        return "torch"
    return "sharded"


def is_shard_dir(path: str) -> bool:
    """A directory holding a sharded release (its index json)."""
    return os.path.isdir(path) and any(n.endswith(INDEX_SUFFIX) for n in os.listdir(path))


def output_path(path: str) -> str:
    """What a release output creates: the file, or the shard directory (for an index json)."""
    return os.path.dirname(path) if path.endswith(INDEX_SUFFIX) else path


# ---------------------------------------------------------------------------------------------
# safetensors


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path} is not a safetensors file (header length {n} of a {size}-byte file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} is not a safetensors file (unreadable header: {e})") from e
            if not isinstance(header, dict):
                raise ValueError(f"{path} is not a safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._info: dict[str, tuple[Entry, int]] = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            entry = Entry(info["shape"], dtype)
            begin, end = info["data_offsets"]
            if end - begin != entry.nbytes or self._base + end > size:
                raise ValueError(
                    f"{path}: tensor {name} (shape {info['shape']}, {info['dtype']}) "
                    f"has byte range [{begin}, {end}) that does not fit its shape or "
                    f"the {size}-byte file"
                )
            self._info[name] = (entry, self._base + begin)
        self._map = map_file(path)
        self.digests = _parse_digests(self.metadata.get(DIGESTS_METADATA), list(header), path)

    def entries(self) -> dict[str, Entry]:
        return {k: e for k, (e, _) in self._info.items()}

    def get(self, name: str) -> np.ndarray:
        entry, offset = self._info[name]
        array = mapped_array(self._map, entry.dtype, entry.shape, offset)
        check_tensor(self.path, name, array, self.digests)
        return array


def _parse_digests(text: str | None, names: list[str], path: str) -> dict[str, int]:
    if not text:
        return {}
    if len(text) != 8 * len(names):
        raise digest.CorruptCheckpoint(
            path, [f"{path}: digest table of {len(text)} characters for {len(names)} tensors"]
        )
    try:
        return {n: int(text[8 * i : 8 * i + 8], 16) for i, n in enumerate(names)}
    except ValueError:
        raise digest.CorruptCheckpoint(path, [f"{path}: unreadable digest table"]) from None


def check_tensor(path: str, name: str, array: np.ndarray, digests: dict[str, int]) -> None:
    """Raise CorruptCheckpoint if `array`'s bytes differ from the CRC recorded at write."""
    want = digests.get(name)
    if want is not None and digest.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8)) != want:
        raise digest.CorruptCheckpoint(path, [f"{path}: tensor {name} changed"])


class SafetensorsOut:
    """A safetensors file laid out from the entries up front, filled one tensor at a time; each
    tensor's CRC-32 goes into space reserved in the header's metadata when the file is closed."""

    def __init__(self, path: str, entries: dict[str, Entry], metadata: dict[str, str] | None = None):
        self.path = path
        header: dict = {"__metadata__": {**(metadata or {}), DIGESTS_METADATA: "0" * 8 * len(entries)}}
        self._names = list(entries)
        self._crcs: dict[str, int] = {}
        offset = 0
        self._offsets = {}
        for name, e in entries.items():
            if e.dtype not in _ST_NAMES:
                raise ValueError(f"{path}: safetensors cannot store {name} as {e.dtype}")
            header[name] = {
                "dtype": _ST_NAMES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            self._offsets[name] = offset
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._digests_at = 8 + raw.index(f'"{DIGESTS_METADATA}":"'.encode()) + len(DIGESTS_METADATA) + 4
        self._base = 8 + len(raw)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(self._base + offset)
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, name: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        pwrite_all(self._fd, data, self._base + self._offsets[name])
        self._crcs[name] = digest.crc32(data)

    def close(self) -> None:
        if self._fd is not None:
            text = "".join(f"{self._crcs.get(n, 0):08x}" for n in self._names).encode()
            os.pwrite(self._fd, text, self._digests_at)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------
# torch .pt / .bin (flat state dict)


class TorchStateFile:
    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            self._zip = torchzip.TorchZipFile(path)
            sd, self._torch = self._zip.obj, False
        except torchzip.NeedsTorch:
            # Only for files the torch-free parser does not handle; torch's weights-only
            # unpickler decides whether they are safe to read.
            sd, self._torch = torchzip.load_torch_file(path), True
        if not isinstance(sd, dict):
            raise ValueError(
                f"{path} holds a {type(sd).__name__}, not a flat {{name: tensor}} state dict like the release dit.pt"
            )
        tensor_type = _torch_tensor_type() if self._torch else torchzip.TensorRef
        for name, value in sd.items():
            if not isinstance(value, tensor_type):
                kind = "dict" if isinstance(value, dict) else type(value).__name__
                raise ValueError(
                    f"{path}: entry {name!r} is a {kind}, not a tensor (the file is "
                    f"not a flat {{name: tensor}} state dict like the release dit.pt)"
                )
        self._sd = sd

    def entries(self) -> dict[str, Entry]:
        if self._torch:
            return {k: Entry(v.shape, numpy_dtype_of_torch(v.dtype)) for k, v in self._sd.items()}
        return {k: v.entry for k, v in self._sd.items()}

    @property
    def digests(self) -> dict[str, int]:
        if self._torch:
            return {}
        by_storage = self._zip.digests
        return {n: by_storage[r.storage.key] for n, r in self._sd.items() if r.storage.key in by_storage}

    def get(self, name: str) -> np.ndarray:
        if self._torch:
            return from_torch(self._sd[name])
        return self._zip.array(self._sd[name], name)


def _torch_tensor_type():
    import torch  # only reached after torch.load, so torch is already imported

    return torch.Tensor


def _open_file(path: str):
    return SafetensorsFile(path) if path.endswith(".safetensors") else TorchStateFile(path)


# ---------------------------------------------------------------------------------------------
# Readers and writers


def _index_path(path: str) -> str:
    if path.endswith(INDEX_SUFFIX):
        return path
    for name in (ST_INDEX, BIN_INDEX):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path}: no {ST_INDEX} or {BIN_INDEX} in the directory")


class ReleaseReader(Reader):
    format = "release"

    def __init__(self, path: str):
        self.path = path
        self.kind = kind_of(path)
        self._files: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self._entries: dict[str, Entry] = {}
        if self.kind == "sharded":
            index = _index_path(path)
            self.index = index
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{index}: not a sharded-checkpoint index with a weight_map ({type(e).__name__}: {e})"
                    ) from e
            root = os.path.dirname(index)
            for shard in dict.fromkeys(weight_map.values()):
                shard_path = os.path.join(root, shard)
                if not os.path.isfile(shard_path):
                    raise FileNotFoundError(f"{index} names shard {shard}, which does not exist")
                f = _open_file(shard_path)
                self._files[shard_path] = f
                for name, entry in f.entries().items():
                    if weight_map.get(name) != shard:
                        raise ValueError(f"{shard_path}: tensor {name} is not mapped to this shard by {index}")
                    self._entries[name] = entry
                    self._where[name] = shard_path
            missing = [n for n in weight_map if n not in self._entries]
            if missing:
                raise ValueError(f"{index} maps {len(missing)} tensors that no shard holds (first: {missing[:5]})")
        else:
            f = _open_file(path)
            self._files[path] = f
            for name, entry in f.entries().items():
                self._entries[name] = entry
                self._where[name] = path
        meta = getattr(next(iter(self._files.values())), "metadata", {}) if self._files else {}
        if CONFIG_METADATA in meta:
            self.stored_config = DiTConfig.from_dict(json.loads(meta[CONFIG_METADATA]))
        self.stored_vae_config = None
        if VAE_CONFIG_METADATA in meta:
            self.stored_vae_config = VAEConfig.from_dict(json.loads(meta[VAE_CONFIG_METADATA]))

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a numpy view of the mapped file (copy-on-write; safe from any thread)."""
        if name not in self._where:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._files[self._where[name]].get(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.get(name)

    def jobs(self):
        # Reading a tensor (and checking its CRC) runs on the consumer's threads, in parallel.
        for name in self._entries:
            yield name, functools.partial(self.get, name)

    def integrity(self) -> digest.Check | None:
        """Every tensor against the CRC recorded at write (None when the files record none: the
        official release, files of other tools)."""
        known = [n for n in self._entries if n in getattr(self._files[self._where[n]], "digests", {})]
        if not known:
            return None
        problems, checked = [], 0
        for name in known:
            try:
                array = self.get(name)
                checked += array.nbytes
            except digest.CorruptCheckpoint as e:
                problems += e.problems
        unchecked = [n for n in self._entries if n not in known]
        problems += [f"{self._where[n]}: tensor {n} has no recorded CRC" for n in unchecked]
        return digest.Check(problems, checked)

    def close(self) -> None:
        # Arrays already handed out keep their mapping alive; the file closes with the last one.
        self._files = {}

    def describe(self) -> dict:
        d = {
            "layout": {
                "sharded": "sharded with an index",
                "safetensors": "single safetensors",
                "torch": "single torch file",
            }[self.kind]
        }
        if self.kind == "sharded":
            d["index"] = self.index
            d["shards"] = len(self._files)
        return d


def _plan_shards(entries: dict[str, Entry], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, e in entries.items():
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += e.nbytes
    return shards


class ReleaseWriter(Writer):
    format = "release"

    def __init__(
        self,
        target: str,
        tmp: str,
        config: DiTConfig | VAEConfig,
        entries: dict[str, Entry],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ):
        super().__init__(target, config, entries)
        self.kind = kind_of(target)
        self._outs: dict[str, object] = {}
        self._where: dict[str, str] = {}
        key = VAE_CONFIG_METADATA if isinstance(config, VAEConfig) else CONFIG_METADATA
        meta = {"format": "pt", key: json.dumps(config.to_dict())}
        if self.kind == "sharded":
            index_name = os.path.basename(target) if target.endswith(INDEX_SUFFIX) else ST_INDEX
            if index_name not in (ST_INDEX, BIN_INDEX):
                raise ValueError(f"{target}: a sharded release is named by its index, {ST_INDEX} or {BIN_INDEX}")
            os.makedirs(tmp)
            safetensors = index_name == ST_INDEX
            plan = _plan_shards(self.entries, max_shard_bytes)
            stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
            weight_map = {}
            for i, names in enumerate(plan):
                shard = f"{stem}-{i + 1:05d}-of-{len(plan):05d}.{ext}"
                sub = {n: self.entries[n] for n in names}
                out = self._open(os.path.join(tmp, shard), sub, meta if safetensors else None)
                self._outs[shard] = out
                for n in names:
                    self._where[n] = shard
                    weight_map[n] = shard
            total = sum(e.nbytes for e in self.entries.values())
            with open(os.path.join(tmp, index_name), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        else:
            self._outs[target] = self._open(tmp, self.entries, meta if self.kind == "safetensors" else None)
            self._where = {n: target for n in self.entries}

    @staticmethod
    def _open(path: str, entries: dict[str, Entry], meta):
        if path.endswith(".safetensors") or meta is not None:
            return SafetensorsOut(path, entries, meta)
        # The release .pt is a flat {name: tensor}: nothing else may go in it.
        slots = {n: torchzip.TensorSlot(str(i), e) for i, (n, e) in enumerate(entries.items())}
        out = torchzip.StreamingTorchFile(path, slots, list(slots.values()))
        out.keys = {n: s.key for n, s in slots.items()}
        return out

    def _write(self, name: str, array: np.ndarray) -> None:
        out = self._outs[self._where[name]]
        if isinstance(out, torchzip.StreamingTorchFile):
            out.write(out.keys[name], array)
        else:
            out.write(name, array)

    def finish(self) -> None:
        for out in self._outs.values():
            out.close()

    def abort(self) -> None:
        for out in self._outs.values():
            out.abort()
