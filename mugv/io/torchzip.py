"""Streaming writer and memory-mapped reader of torch.save files (the zip format `torch.load` reads).

`torch.save` needs every tensor in memory at once. This writer produces the same file without
that: the pickle of the object (with placeholders that pickle exactly like CPU tensors) and
the zip records are written first with space reserved for each tensor's bytes (torch's own
`write_record_metadata`, as used by `torch.serialization.skip_data`), then each tensor's bytes
are written into its reserved record whenever the tensor arrives, in any order. The result
loads with `torch.load(weights_only=True)` and `mmap=True`.

Reading (`TorchZipFile`) needs no torch: the archive's records are stored uncompressed, so the
file is memory-mapped and its pickle replayed by an unpickler that knows only what a state dict
holds (dicts, OrderedDict, numbers, strings, tensors and parameters over typed storages); each
tensor becomes a reference to its bytes, turned into a numpy view of the mapping when asked for.
Files outside that (other globals, compressed or big-endian records, the pre-1.6 non-zip format)
raise `NeedsTorch`; callers then use `load_torch_file` (torch's weights-only unpickler).
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import re
import struct
import sys
import zipfile
from typing import Any

import numpy as np

from mugv.io.base import BF16, Entry, map_file, mapped_array, pwrite_all, torch_dtype_of
from mugv.io.digest import CorruptCheckpoint, crc32

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
# Our streaming writer's record of each storage's CRC-32 (mugv.io.digest).
DIGESTS_RECORD = "mugv_crc32"


class TensorSlot:
    """Placeholder for one tensor of the object to save; pickles like a contiguous CPU tensor."""

    def __init__(self, key: str, entry: Entry):
        self.key = key
        self.entry = entry

    def __reduce_ex__(self, protocol):
        import torch

        shape = self.entry.shape
        stride = tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape)))
        return (
            torch._utils._rebuild_tensor_v2,
            (_StorageSlot(self), 0, shape, stride, False, collections.OrderedDict()),
        )


class _StorageSlot:
    def __init__(self, tensor: TensorSlot):
        self.tensor = tensor


def _storage_type(dtype):
    import torch

    name = torch.storage._dtype_to_storage_type_map()[torch_dtype_of(dtype)]
    return getattr(torch, name)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        # The tuple torch.save writes for a storage: ("storage", type, key, location, numel).
        if isinstance(obj, _StorageSlot):
            t = obj.tensor
            return ("storage", _storage_type(t.entry.dtype), t.key, "cpu", int(np.prod(t.entry.shape, dtype=np.int64)))
        return None


def _record_data_offset(f, info: zipfile.ZipInfo) -> int:
    """Where the bytes of record `info` start in the archive open as `f` (the local header's
    name and extra fields may differ in length from the central directory's)."""
    f.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


class StreamingTorchFile:
    """A torch.save file of `obj` whose TensorSlots are filled by `write(key, array)` later.

    `obj` is any picklable structure (dicts, numbers, strings, None) holding TensorSlot leaves.
    """

    def __init__(self, path: str, obj: Any, slots: list[TensorSlot]):
        import torch

        self.path = path
        self._slots = {s.key: s for s in slots}
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        # No CRC: the bytes are not known yet when the records are laid out (torch.load does not
        # check it; skip_data files are the same).
        writer = torch._C.PyTorchFileWriter(path, False, torch.serialization._get_storage_alignment())
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for s in slots:
            writer.write_record_metadata(f"data/{s.key}", s.entry.nbytes)
        # Each storage's CRC-32 (8 hex digits, in slot order), filled in on close; torch.load
        # ignores the record, TorchZipFile checks each tensor against it.
        writer.write_record_metadata(DIGESTS_RECORD, 8 * (len(slots) + 1))
        writer.write_end_of_file()
        del writer
        with zipfile.ZipFile(path) as z:
            records = {info.filename.split("/", 1)[1]: info for info in z.infolist()}
        with open(path, "rb") as f:
            self._offsets = {key: _record_data_offset(f, records[f"data/{key}"]) for key in self._slots}
            self._digests_at = _record_data_offset(f, records[DIGESTS_RECORD])
        self._crcs: dict[str, int] = {}
        self._pickle_crc = crc32(data)
        self._fd = os.open(path, os.O_WRONLY)
        self._pending = set(self._slots)

    def write(self, key: str, array: np.ndarray) -> None:
        slot = self._slots[key]
        if tuple(array.shape) != slot.entry.shape or array.dtype != slot.entry.dtype:
            raise ValueError(
                f"{self.path}: record {key} expects {list(slot.entry.shape)} "
                f"{slot.entry.dtype}, got {list(array.shape)} {array.dtype}"
            )
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        pwrite_all(self._fd, data, self._offsets[key])
        self._crcs[key] = crc32(data)
        self._pending.discard(key)

    def close(self) -> None:
        if self._fd is not None:
            if self._pending:
                os.close(self._fd)
                self._fd = None
                raise RuntimeError(f"{self.path}: {len(self._pending)} tensors never written")
            text = "".join(f"{self._crcs[k]:08x}" for k in self._slots) + f"{self._pickle_crc:08x}"
            os.pwrite(self._fd, text.encode(), self._digests_at)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def load_torch_file(path: str, allow=()):
    """`torch.load(path, weights_only=True)` with the file named in any error, memory-mapped
    unless the file predates the zip format (torch cannot map those; they are read whole).

    `allow`: classes and functions admitted beside torch's weights-only allowlist (exactly
    these, e.g. `mugv.io.megatron.SAFE_GLOBALS`). A refused global is named in the error.
    """
    import torch

    mmap = zipfile.is_zipfile(path)
    # The context removes what it added on exit: admit only what is not admitted already, or a
    # class megatron.core registered for the whole process (its `args`, numpy) would go with it.
    present = set(torch.serialization.get_safe_globals())
    try:
        with torch.serialization.safe_globals([g for g in allow if g not in present]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it holds a {refused.group(1)}, which is not read" if refused else str(e).splitlines()[0][:500]
        raise ValueError(f"cannot read {path} as a torch checkpoint with weights_only=True: {what}") from e


# ---------------------------------------------------------------------------------------------
# Reading without torch


class NeedsTorch(Exception):
    """The file is a torch checkpoint this reader does not parse; torch.load may."""


# torch.save pickles a storage's type as the global torch.<Name>Storage.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": BF16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


class _Storage:
    def __init__(self, key: str, dtype: np.dtype, numel: int, offset: int):
        self.key, self.dtype, self.numel, self.offset = key, dtype, numel, offset


class TensorRef:
    """A tensor of the file, not yet read: its storage, offset, shape and strides (elements)."""

    def __init__(self, storage: _Storage, offset: int, shape, stride):
        self.storage, self.storage_offset = storage, int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)

    @property
    def entry(self) -> Entry:
        return Entry(self.shape, self.storage.dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class Unread:
    """Stands for an object of a class outside the state-dict allow-list (`kind`: its
    "module.name"), in files read with `unread_globals`: the class is never looked up or called,
    and whatever the pickle gives it (arguments, state, items) is dropped. A Megatron-LM
    checkpoint holds such objects beside its tensors (`args` enums, numpy RNG state, TE's
    `io.BytesIO` extra state); a reader that needs one of them as a tensor names `kind`."""

    kind = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def add(self, value):
        pass

    def __repr__(self):
        return f"<unread {self.kind}>"


def _unread_class(module: str, name: str) -> type:
    return type("Unread", (Unread,), {"kind": f"{module}.{name}"})


class _StateUnpickler(pickle.Unpickler):
    def __init__(self, file, records, path: str, unread_globals: bool = False):
        super().__init__(file)
        self._records, self._path, self._unread = records, path, unread_globals
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if self._unread:
            # A plain attribute container (Megatron's `args`), safe to build; anything else stands in.
            return argparse.Namespace if (module, name) == ("argparse", "Namespace") else _unread_class(module, name)
        raise NeedsTorch(f"global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise NeedsTorch(f"persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if key not in self._storages:
            offset, nbytes = self._records(key)
            if nbytes != numel * stype.dtype.itemsize:
                raise ValueError(
                    f"{self._path}: tensor data data/{key} holds {nbytes} bytes, the "
                    f"pickle says {numel} elements of {stype.dtype.itemsize} bytes"
                )
            self._storages[key] = _Storage(key, stype.dtype, int(numel), offset)
        storage = self._storages[key]
        if storage.dtype != stype.dtype:
            raise NeedsTorch(f"storage data/{key} viewed as two dtypes")
        return storage


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a file of their own (an archive that
    sits inside a larger file, like each tensor of a torch_dist .distcp file)."""

    def __init__(self, f, start: int, length: int):
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self):
        return self._pos

    def read(self, n=-1):
        end = self._length if n is None or n < 0 else min(self._length, self._pos + n)
        if end <= self._pos:
            return b""
        data = os.pread(self._f.fileno(), end - self._pos, self._start + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _read_record(f, info: zipfile.ZipInfo, path: str) -> bytes:
    # Not ZipFile.read: streaming writers (ours, torch's skip_data, DCP without CRCs) leave the
    # CRCs unset, and torch.load does not check them either.
    if info.compress_type != zipfile.ZIP_STORED:
        raise NeedsTorch(f"compressed record {info.filename}")
    f.seek(_record_data_offset(f, info))
    data = f.read(info.file_size)
    if len(data) != info.file_size:
        raise ValueError(f"{path}: record {info.filename} is cut short")
    return data


class TorchZipFile:
    """The object a torch.save zip file holds, with every tensor a `TensorRef` into the mapped
    file; `array(ref, name)` gives the tensor as a numpy view.

    `start`/`length` read an archive stored inside a larger file (a torch_dist .distcp holds one
    per tensor); `mapping` is that file's mapping when the caller shares one between archives.
    `unread_globals`: objects of classes outside the allow-list become `Unread` stand-ins
    instead of refusing the file (Megatron files: only their tensors and plain values are read).
    """

    def __init__(
        self, path: str, start: int = 0, length: int | None = None, mapping=None, *, unread_globals: bool = False
    ):
        self.path = path
        with open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size if length is None else length
            f = _Window(raw, start, size)
            if not zipfile.is_zipfile(f):
                raise NeedsTorch("not a zip archive (the pre-1.6 torch.save format)")
            with zipfile.ZipFile(f) as z:
                infos = z.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pickles) != 1:
                raise NeedsTorch(f"{len(pickles)} data.pkl records")
            prefix = pickles[0].filename[: -len("data.pkl")]
            by_name = {i.filename: i for i in infos}
            order = by_name.get(prefix + "byteorder")
            if order is not None and _read_record(f, order, path) != b"little":
                raise NeedsTorch("big-endian tensor data")
            data = _read_record(f, pickles[0], path)
            offsets = {}
            for name, info in by_name.items():
                if name.startswith(prefix + "data/"):
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise NeedsTorch(f"compressed record {name}")
                    offsets[name[len(prefix) + 5 :]] = (start + _record_data_offset(f, info), info.file_size)
            digests = by_name.get(prefix + DIGESTS_RECORD)
            digests = None if digests is None else _read_record(f, digests, path)

        def record(key: str) -> tuple[int, int]:
            if key not in offsets:
                raise ValueError(
                    f"{path}: the pickle refers to tensor data data/{key}, which the archive does not hold"
                )
            return offsets[key]

        try:
            self.obj = _StateUnpickler(io.BytesIO(data), record, path, unread_globals).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise ValueError(f"cannot read {path} as a torch checkpoint: {str(e).splitlines()[0][:500]}") from e
        self._map = mapping if mapping is not None else map_file(path)
        self.digests: dict[str, int] = {}
        if digests is not None:
            # Our writer's storages are keyed 0..n-1 in slot order, as the record lists them.
            keys = sorted(offsets, key=lambda k: (len(k), k))
            if len(digests) != 8 * (len(keys) + 1):
                raise CorruptCheckpoint(
                    path, [f"{path}: digest record of {len(digests)} bytes for {len(keys)} tensors"]
                )
            try:
                crcs = [int(digests[i : i + 8], 16) for i in range(0, len(digests), 8)]
            except ValueError:
                raise CorruptCheckpoint(path, [f"{path}: unreadable digest record"]) from None
            if crc32(data) != crcs[-1]:
                raise CorruptCheckpoint(path, [f"{path}: the pickled structure (names, shapes, dtypes) changed"])
            self.digests = dict(zip(keys, crcs))

    def array(self, ref: TensorRef, name: str) -> np.ndarray:
        """Tensor `name` (for errors) as a numpy view of the file, without a copy."""
        s = ref.storage
        if any(n == 0 for n in ref.shape):
            return np.empty(ref.shape, s.dtype)
        last = ref.storage_offset + sum((n - 1) * st for n, st in zip(ref.shape, ref.stride))
        if ref.storage_offset < 0 or min(ref.stride, default=0) < 0 or last >= s.numel:
            raise ValueError(
                f"{self.path}: tensor {name} (shape {list(ref.shape)}, offset "
                f"{ref.storage_offset}, strides {list(ref.stride)}) reaches past its "
                f"storage data/{s.key} of {s.numel} elements"
            )
        want = self.digests.get(s.key)
        if want is not None:
            whole = mapped_array(self._map, np.uint8, (s.numel * s.dtype.itemsize,), s.offset, prefetch=False)
            if crc32(whole) != want:
                raise CorruptCheckpoint(self.path, [f"{self.path}: tensor {name} (storage data/{s.key}) changed"])
        contiguous = tuple(int(np.prod(ref.shape[i + 1 :], dtype=np.int64)) for i in range(len(ref.shape)))
        if ref.stride == contiguous:
            return mapped_array(self._map, s.dtype, ref.shape, s.offset + ref.storage_offset * s.dtype.itemsize)
        # A strided view (saved from a transpose or slice): a view of the whole storage.
        base = mapped_array(self._map, s.dtype, (s.numel,), s.offset, prefetch=False)
        item = s.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            base[ref.storage_offset :], ref.shape, [st * item for st in ref.stride], writeable=False
        )
