"""array_record shards through a tensorflow-datasets builder (no TensorFlow, no Beam).

One example per clip:
  latents   float32 [C, F, H, W]   normalised VAE latents (the VAE's (z − shift)/scale, once)
  text      float32 [n, D]         caption token features, only the n valid tokens
  text_len  int32                  n
  fps, num_frames, height, width   the clip's pixel-space frame rate, frame count and size
  bucket_id int32                  index into the dataset's bucket table (index.json)
  caption, sample_id, source_id    strings

Layout: `<out>/<name>/<version>/` holds tfds's `*.array_record-NNNNN-of-MMMMM`, `features.json`,
`dataset_info.json`, plus our `index.json` (per-record bucket ids and the bucket table, so the
loader can plan batches without decoding latents). tfds writes into an `incomplete.*` directory
and renames it when every shard is done, so a crash leaves nothing a reader would open; a second
`write_shards` on a finished directory reuses it (idempotent). `disable_shuffling` keeps records
in generator order, which `index.json` relies on.
"""
from __future__ import annotations

import glob
import json
import os
import threading
from typing import Callable, Iterable, Sequence

import numpy as np

VERSION = "1.0.0"
INDEX_FILE = "index.json"
# Serialises first use of a reader: grain maps on a thread pool, and concurrent first imports of
# tensorflow_datasets in a fresh worker process deadlock on Python's import locks.
_OPEN_LOCK = threading.Lock()


def _tfds():
    import tensorflow_datasets as tfds  # heavy; only needed to write and to read the feature spec
    return tfds


def feature_spec(latent_channels: int, text_dim: int):
    tfds = _tfds()
    T = tfds.features.Tensor
    return tfds.features.FeaturesDict({
        # `bytes` encoding: raw little-endian buffers, so the round trip is bit-exact.
        "latents": T(shape=(latent_channels, None, None, None), dtype=np.float32, encoding="bytes"),
        "text": T(shape=(None, text_dim), dtype=np.float32, encoding="bytes"),
        "text_len": np.int32, "fps": np.float32, "num_frames": np.int32,
        "height": np.int32, "width": np.int32, "bucket_id": np.int32,
        "caption": tfds.features.Text(), "sample_id": tfds.features.Text(),
        "source_id": tfds.features.Text(),
    })


_BUILDER_CLS = None


def _builder_cls():
    """Defined lazily: tfds registers builder classes at definition, and importing tfds is slow."""
    global _BUILDER_CLS
    if _BUILDER_CLS is None:
        tfds = _tfds()

        class MugvClips(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(VERSION)
            # No checksums/metadata files live next to this code; without this tfds goes looking
            # for them through importlib_resources, which is not installed.
            code_path = None

            def __init__(self, *, examples: Callable[[], Iterable[dict]] | None, latent_channels: int,
                         text_dim: int, **kwargs):
                self._examples, self._channels, self._text_dim = examples, latent_channels, text_dim
                self.records: list[dict] = []
                super().__init__(**kwargs)

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=feature_spec(self._channels, self._text_dim),
                                             disable_shuffling=True)

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                if self._examples is None:
                    raise ValueError(f"no examples given and no finished dataset in {self.data_dir}")
                for ex in self._examples():
                    ex = _check_example(ex, self._channels, self._text_dim)
                    self.records.append({"sample_id": ex["sample_id"], "bucket_id": int(ex["bucket_id"])})
                    yield ex["sample_id"], ex

        _BUILDER_CLS = MugvClips
    return _BUILDER_CLS


def _check_example(ex: dict, channels: int, text_dim: int) -> dict:
    lat = np.asarray(ex["latents"], np.float32)
    if lat.ndim != 4 or lat.shape[0] != channels:
        raise ValueError(f"example {ex.get('sample_id')!r}: latents must be [{channels}, F, H, W], got {lat.shape}")
    text = np.asarray(ex["text"], np.float32)
    if text.ndim != 2 or text.shape[1] != text_dim:
        raise ValueError(f"example {ex.get('sample_id')!r}: text must be [n, {text_dim}], got {text.shape}")
    out = dict(ex, latents=lat, text=text)
    out.setdefault("text_len", text.shape[0])
    if int(out["text_len"]) != text.shape[0]:
        raise ValueError(f"example {ex['sample_id']!r}: text_len {out['text_len']} != text rows {text.shape[0]}")
    return out


def dataset_dir(out_dir: str, name: str = "mugv_clips") -> str:
    return os.path.join(out_dir, name, VERSION)


def write_shards(examples: Callable[[], Iterable[dict]], out_dir: str, *, buckets: Sequence[Sequence[int]],
                 latent_channels: int, text_dim: int, name: str = "mugv_clips",
                 num_shards: int | None = None, extra_index: dict | None = None) -> str:
    """Write (or reuse) the dataset `out_dir/name/VERSION`; returns that directory.

    `examples` is a zero-argument callable so nothing is encoded when the dataset already exists.
    `buckets[i]` is bucket i's latent (F, H, W).
    """
    final = dataset_dir(out_dir, name)
    index_path = os.path.join(final, INDEX_FILE)
    if os.path.exists(index_path):
        return final
    records = None
    if not os.path.isdir(final):
        tfds = _tfds()
        root = os.path.join(out_dir, name)
        os.makedirs(root, exist_ok=True)
        # tfds names its directory after the builder class; it builds (through its own
        # `incomplete.*` directory) under a private parent, then one rename publishes it.
        builder = _builder_cls()(examples=examples, latent_channels=latent_channels, text_dim=text_dim,
                                 data_dir=os.path.join(root, ".tfds"), file_format="array_record")
        config = tfds.download.DownloadConfig(num_shards=num_shards) if num_shards else None
        builder.download_and_prepare(download_config=config)
        os.replace(str(builder.data_dir), final)
        records = builder.records
    if not records:
        # A build published before a crash (or reused by tfds): the shards themselves say it all.
        records = scan_records(final)
    index = {"num_examples": len(records), "latent_channels": latent_channels, "text_dim": text_dim,
             "buckets": [list(map(int, b)) for b in buckets],
             "bucket_ids": [r["bucket_id"] for r in records],
             "sample_ids": [r["sample_id"] for r in records], **(extra_index or {})}
    # index.json is the completion marker: readers refuse a directory without it.
    _atomic_json(index_path, index)
    return final


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def shard_files(ds_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(ds_dir, "*.array_record-*-of-*")))
    if not files:
        raise FileNotFoundError(f"no array_record shards in {ds_dir}")
    return files


class RecordReader:
    """Random access to decoded records. Picklable (opens files lazily), so grain workers can use it."""

    def __init__(self, ds_dir: str):
        self.ds_dir = ds_dir
        self.files = shard_files(ds_dir)
        self._source = None
        self._features = None

    def __getstate__(self):
        return {"ds_dir": self.ds_dir, "files": self.files, "_source": None, "_features": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        # Unpickling runs on a worker's main thread, before its thread pool: open (and import
        # tfds) here, single-threaded.
        self._open()

    def _open(self):
        if self._source is not None:
            return
        with _OPEN_LOCK:
            if self._source is None:
                from array_record.python.array_record_data_source import ArrayRecordDataSource
                # Publish the features before the source: `_source` being set is what tells
                # other threads the reader is ready.
                self._features = _tfds().features.FeaturesDict.from_config(self.ds_dir)
                self._source = ArrayRecordDataSource(self.files)

    def __len__(self) -> int:
        self._open()
        return len(self._source)

    def raw(self, index: int) -> bytes:
        self._open()
        return self._source[index]

    def __getitem__(self, index: int) -> dict:
        raw = self.raw(index)
        ex = self._features.deserialize_example_np(raw)
        for k in ("caption", "sample_id", "source_id"):
            if isinstance(ex[k], bytes):
                ex[k] = ex[k].decode()
        return ex


def scan_records(ds_dir: str) -> list[dict]:
    reader = RecordReader(ds_dir)
    out = []
    for i in range(len(reader)):
        ex = reader[i]
        out.append({"sample_id": ex["sample_id"], "bucket_id": int(ex["bucket_id"])})
    return out


def read_index(ds_dir: str) -> dict:
    path = os.path.join(ds_dir, INDEX_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: not a finished mugv_data dataset directory")
    with open(path) as f:
        return json.load(f)
