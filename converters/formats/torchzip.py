"""Streaming writer and reader of torch.save files (the zip format `torch.load` reads).

`torch.save` needs every tensor in memory at once. This writer produces the same file without
that: the pickle of the object (with placeholders that pickle exactly like CPU tensors) and
the zip records are written first with space reserved for each tensor's bytes (torch's own
`write_record_metadata`, as used by `torch.serialization.skip_data`), then each tensor's bytes
are written into its reserved record whenever the tensor arrives, in any order. The result
loads with `torch.load(weights_only=True)` and `mmap=True`.

Reading uses `torch.load(weights_only=True, mmap=True)`: nothing is read until a tensor is
touched.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from typing import Any

import numpy as np

from converters.formats.base import Entry, pwrite_all, torch_dtype_of

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")


class TensorSlot:
    """Placeholder for one tensor of the object to save; pickles like a contiguous CPU tensor."""

    def __init__(self, key: str, entry: Entry):
        self.key = key
        self.entry = entry

    def __reduce_ex__(self, protocol):
        import torch
        shape = self.entry.shape
        stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        return (torch._utils._rebuild_tensor_v2,
                (_StorageSlot(self), 0, shape, stride, False, collections.OrderedDict()))


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
            return ("storage", _storage_type(t.entry.dtype), t.key, "cpu",
                    int(np.prod(t.entry.shape, dtype=np.int64)))
        return None


def _record_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
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
        writer.write_end_of_file()
        del writer
        with zipfile.ZipFile(path) as z:
            records = {info.filename.split("/", 1)[1]: info for info in z.infolist()}
        self._offsets = {key: _record_data_offset(path, records[f"data/{key}"]) for key in self._slots}
        self._fd = os.open(path, os.O_WRONLY)
        self._pending = set(self._slots)

    def write(self, key: str, array: np.ndarray) -> None:
        slot = self._slots[key]
        if tuple(array.shape) != slot.entry.shape or array.dtype != slot.entry.dtype:
            raise ValueError(f"{self.path}: record {key} expects {list(slot.entry.shape)} "
                             f"{slot.entry.dtype}, got {list(array.shape)} {array.dtype}")
        pwrite_all(self._fd, array, self._offsets[key])
        self._pending.discard(key)

    def close(self) -> None:
        if self._fd is not None:
            if self._pending:
                os.close(self._fd)
                self._fd = None
                raise RuntimeError(f"{self.path}: {len(self._pending)} tensors never written")
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def load_torch_file(path: str, allow_namespace: bool = False):
    """`torch.load(path, weights_only=True, mmap=True)` with the file named in any error.

    `allow_namespace` admits `argparse.Namespace` (Megatron's saved `args`), which holds plain
    values and so is as safe as the weights-only allowlist.
    """
    import argparse
    import torch
    try:
        if allow_namespace:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {path} as a torch checkpoint with weights_only=True: "
                         f"{str(e).splitlines()[0][:500]}") from e
