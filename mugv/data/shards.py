"""array_record shards through a tensorflow-datasets builder (no TensorFlow), in one process or
on Apache Beam (tfds's Beam path: DirectRunner here, Dataflow/Flink/Spark for millions of clips).

One example per clip:
  latents   bf16 [C, F, H, W]      normalised VAE latents (the VAE's (z − shift)/scale, once),
                                   stored as their uint16 bit patterns (`latent_dtype="bfloat16"`,
                                   the default; half the bytes of float32) or as float32. Readers
                                   always get float32.
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
in key order: integer keys that both paths assign the same way, so the Beam path writes the same
records in the same order as the one-process path (shard boundaries may differ).
"""

from __future__ import annotations

import glob
import json
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from mugv.io import digest
from mugv.io.atomic import remove_path, remove_stale_partials, temp_name

LATENT_DTYPES = ("bfloat16", "float32")
VERSION = "1.0.0"
INDEX_FILE = "index.json"
# Serialises first use of a reader: grain maps on a thread pool, and concurrent first imports of
# tensorflow_datasets in a fresh worker process deadlock on Python's import locks.
_OPEN_LOCK = threading.Lock()


def _tfds():
    import tensorflow_datasets as tfds  # heavy; only needed to write and to read the feature spec

    return tfds


def _storage_dtype(latent_dtype: str):
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
    # bf16 goes in as its raw 16-bit patterns: tfds's numpy-only codec has no bfloat16 type.
    return np.uint16 if latent_dtype == "bfloat16" else np.float32


def to_storage(latents, latent_dtype: str) -> np.ndarray:
    """Latents as stored: float32, or bf16 (round to nearest even) bit patterns as uint16."""
    if latent_dtype == "float32":
        return np.asarray(latents, np.float32)
    import ml_dtypes

    a = np.asarray(latents)
    if a.dtype != ml_dtypes.bfloat16:
        a = a.astype(np.float32).astype(ml_dtypes.bfloat16)
    return a.view(np.uint16)


def from_storage(latents: np.ndarray) -> np.ndarray:
    """Stored latents → float32 (uint16 means bf16 bits; float32 shards are read as they are)."""
    if latents.dtype == np.uint16:
        import ml_dtypes

        return latents.view(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(latents, np.float32)


def feature_spec(latent_channels: int, text_dim: int, latent_dtype: str = "bfloat16"):
    tfds = _tfds()
    T = tfds.features.Tensor
    return tfds.features.FeaturesDict(
        {
            # `bytes` encoding: raw little-endian buffers, so the round trip is bit-exact.
            "latents": T(
                shape=(latent_channels, None, None, None), dtype=_storage_dtype(latent_dtype), encoding="bytes"
            ),
            "text": T(shape=(None, text_dim), dtype=np.float32, encoding="bytes"),
            "text_len": np.int32,
            "fps": np.float32,
            "num_frames": np.int32,
            "height": np.int32,
            "width": np.int32,
            "bucket_id": np.int32,
            "caption": tfds.features.Text(),
            "sample_id": tfds.features.Text(),
            "source_id": tfds.features.Text(),
        }
    )


_BUILDER_CLS = None


def _keyed(examples) -> Iterator[tuple[int, dict]]:
    """(key, example) in key order: a source's own keys, or positions for a plain callable."""
    if hasattr(examples, "keyed_examples"):
        return examples.keyed_examples()
    return enumerate(examples())


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

            def __init__(
                self,
                *,
                examples,
                latent_channels: int,
                text_dim: int,
                latent_dtype: str = "bfloat16",
                beam: bool = False,
                **kwargs,
            ):
                self._examples, self._channels, self._text_dim = examples, latent_channels, text_dim
                self._latent_dtype, self._beam = latent_dtype, beam
                self.records: list[dict] = []
                super().__init__(**kwargs)

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=feature_spec(self._channels, self._text_dim, self._latent_dtype),
                    disable_shuffling=True,
                )

            def _split_generators(self, dl_manager):
                if self._examples is None:
                    raise ValueError(f"no examples given and no finished dataset in {self.data_dir}")
                if self._beam:
                    return {
                        "train": _beam_transform(self._examples, self._channels, self._text_dim, self._latent_dtype)
                    }
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for key, ex in _keyed(self._examples):
                    ex = _check_example(ex, self._channels, self._text_dim, self._latent_dtype)
                    self.records.append(
                        {
                            "key": key,
                            "sample_id": ex["sample_id"],
                            "bucket_id": int(ex["bucket_id"]),
                            "text_len": int(ex["text_len"]),
                        }
                    )
                    yield key, ex

        _BUILDER_CLS = MugvClips
    return _BUILDER_CLS


def _beam_transform(source, channels: int, text_dim: int, latent_dtype: str):
    """The split as a Beam PTransform: the source's keyed examples, checked and converted on the
    workers. tfds's BeamWriter then writes them in key order (disable_shuffling)."""
    import apache_beam as beam

    if not hasattr(source, "beam_examples"):
        raise ValueError(
            "the Beam path needs a source with beam_examples(pipeline) (e.g. "
            "mugv_data.prepare.PrepareSource), not a plain callable"
        )

    def check(kv):
        return kv[0], _check_example(kv[1], channels, text_dim, latent_dtype)

    @beam.ptransform_fn
    def expand(pbegin):
        return source.beam_examples(pbegin) | "CheckExamples" >> beam.Map(check)

    return expand()  # pylint: disable=no-value-for-parameter


def _check_example(ex: dict, channels: int, text_dim: int, latent_dtype: str = "float32") -> dict:
    lat = np.asarray(ex["latents"])
    if lat.ndim != 4 or lat.shape[0] != channels:
        raise ValueError(f"example {ex.get('sample_id')!r}: latents must be [{channels}, F, H, W], got {lat.shape}")
    text = np.asarray(ex["text"], np.float32)
    if text.ndim != 2 or text.shape[1] != text_dim:
        raise ValueError(f"example {ex.get('sample_id')!r}: text must be [n, {text_dim}], got {text.shape}")
    out = {k: v for k, v in ex.items() if not k.startswith("_")}  # private fields stay out of shards
    out.update(latents=to_storage(lat, latent_dtype), text=text)
    out.setdefault("text_len", text.shape[0])
    if int(out["text_len"]) != text.shape[0]:
        raise ValueError(f"example {ex['sample_id']!r}: text_len {out['text_len']} != text rows {text.shape[0]}")
    return out


def dataset_dir(out_dir: str, name: str = "mugv_clips") -> str:
    return os.path.join(out_dir, name, VERSION)


def beam_pipeline_options(runner: str, workers: int = 0, extra: Sequence[str] = ()):
    """PipelineOptions for `runner`; for the DirectRunner, `workers` > 0 runs that many worker
    processes (multi_processing). Other runners take their own flags through `extra` (see
    docs/data.md: Dataflow, Flink, Spark)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = [f"--runner={runner}", *extra]
    if runner == "DirectRunner" and workers > 0:
        if not any(f.startswith("--direct_num_workers") for f in extra):
            flags.append(f"--direct_num_workers={workers}")
        if not any(f.startswith("--direct_running_mode") for f in extra):
            flags.append("--direct_running_mode=multi_processing")
    return PipelineOptions(flags)


def write_shards(
    examples,
    out_dir: str,
    *,
    buckets: Sequence[Sequence[int]],
    latent_channels: int,
    text_dim: int,
    name: str = "mugv_clips",
    num_shards: int | None = None,
    extra_index: dict | None = None,
    latent_dtype: str = "bfloat16",
    beam_options=None,
) -> str:
    """Write (or reuse) the dataset `out_dir/name/VERSION`; returns that directory.

    `examples` is a zero-argument callable returning examples, or a keyed source (an object with
    `keyed_examples()` and, for Beam, `beam_examples(pipeline)`), so nothing is encoded when the
    dataset already exists. `buckets[i]` is bucket i's latent (F, H, W). `beam_options` (Beam
    PipelineOptions, e.g. from `beam_pipeline_options`) runs the build on Apache Beam.
    """
    from etils import epath  # tfds's path library: local paths, and gs:// etc. for remote runners

    _storage_dtype(latent_dtype)
    final = dataset_dir(out_dir, name)
    index_path = os.path.join(final, INDEX_FILE)
    if epath.Path(index_path).exists():
        return final
    records = None
    if not epath.Path(final).is_dir():
        tfds = _tfds()
        root = os.path.join(out_dir, name)
        epath.Path(root).mkdir(parents=True, exist_ok=True)
        # tfds names its directory after the builder class; it builds (through its own
        # `incomplete.*` directory) under a private parent, then one rename publishes it. Locally
        # the parent is a partial name of this host and process, so a re-run removes what a
        # killed build left (mugv.io.atomic); remote filesystems keep one `.tfds` parent.
        if "://" in root:
            private = os.path.join(root, ".tfds")
        else:
            remove_stale_partials(final)
            private = temp_name(final)
        builder = _builder_cls()(
            examples=examples,
            latent_channels=latent_channels,
            text_dim=text_dim,
            latent_dtype=latent_dtype,
            beam=beam_options is not None,
            data_dir=private,
            file_format="array_record",
        )
        kw = {}
        if num_shards:
            kw["num_shards"] = num_shards
        if beam_options is not None:
            kw["beam_options"] = beam_options
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**kw) if kw else None)
            epath.Path(builder.data_dir).rename(final)
        finally:
            if "://" not in root:
                remove_path(private)
        records = sorted(builder.records, key=lambda r: r["key"])
    if not records:
        # Beam workers, or a build published before a crash: the shards themselves say it all.
        records = scan_records(final)
    index = {
        "num_examples": len(records),
        # Every shard file with its size, CRC-32 and record count: the loader checks them at open.
        "files": shard_table(final),
        "latent_channels": latent_channels,
        "text_dim": text_dim,
        "latent_dtype": latent_dtype,
        "buckets": [list(map(int, b)) for b in buckets],
        "bucket_ids": [r["bucket_id"] for r in records],
        "sample_ids": [r["sample_id"] for r in records],
        "text_lens": [r["text_len"] for r in records],  # caption tokens per record (loaders check their length)
        **(extra_index or {}),
    }
    # index.json is the completion marker: readers refuse a directory without it.
    _atomic_json(index_path, index)
    return final


def _atomic_json(path: str, obj) -> None:
    from etils import epath

    tmp = epath.Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    tmp.rename(path)


def shard_files(ds_dir: str) -> list[str]:
    files = shard_files_in(ds_dir)
    if not files:
        raise FileNotFoundError(f"no array_record shards in {ds_dir}")
    return files


def num_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return int(reader.num_records())
    finally:
        reader.close()


def shard_table(ds_dir: str) -> dict[str, dict]:
    """{shard file name: {size, crc32, records}} in record order (what index.json records)."""
    names = [os.path.basename(f) for f in shard_files(ds_dir)]
    table = digest.compute(ds_dir, names, workers=digest.default_workers())["files"]
    return {n: {**table[n], "records": num_records(os.path.join(ds_dir, n))} for n in names}


class BadShard(RuntimeError):
    """A shard file the index names is missing, of another size, or (when checked) another CRC."""


def check_shards(ds_dir: str, index: dict, *, verify: bool = False) -> dict[str, str]:
    """{shard file: problem} for the files of `ds_dir` that do not match its index: missing or of
    another size always; with `verify`, every byte against the CRC recorded at write. A dataset
    written before the index recorded its files is only checked for shards at all."""
    files = index.get("files")
    if files is None:
        shard_files(ds_dir)
        return {}
    found = digest.check(
        ds_dir, {"algorithm": digest.ALGORITHM, "files": files}, workers=digest.default_workers(), files_only=not verify
    )
    out = {}
    for problem in found.problems:
        name = next((n for n in files if problem.startswith(os.path.join(ds_dir, n) + ":")), problem)
        out[name] = problem
    return out


class RecordReader:
    """Random access to decoded records. Picklable (opens files lazily), so grain workers can use it.

    `files` ({name: record count}, in record order, from index.json) and `exclude` (names) read
    the dataset without some of its files: record numbers stay those of the whole dataset."""

    def __init__(self, ds_dir: str, files: dict[str, int] | None = None, exclude=()):
        self.ds_dir = ds_dir
        self.layout: list[tuple[str, int, int]] = []  # (file, first record, records)
        if files is None:
            self.files = shard_files(ds_dir)
        else:
            first = 0
            for name, count in files.items():
                self.layout.append((name, first, int(count)))
                first += int(count)
            self.files = [os.path.join(ds_dir, n) for n, _, _ in self.layout if n not in exclude]
        self.excluded = set(exclude)
        self._source = None
        self._features = None

    def locate(self, index: int) -> str:
        """The shard file that holds record `index` (for errors)."""
        for name, first, count in self.layout:
            if first <= index < first + count:
                return name
        return f"one of the shards of {self.ds_dir}"

    def _local(self, index: int) -> int:
        if not self.excluded:
            return index
        before = 0
        for name, first, count in self.layout:
            if first <= index < first + count:
                if name in self.excluded:
                    raise KeyError(f"record {index} is in excluded shard {name}")
                return index - first + before
            if name not in self.excluded:
                before += count
        raise IndexError(f"record {index} is not in {self.ds_dir}")

    def __getstate__(self):
        return {
            "ds_dir": self.ds_dir,
            "files": self.files,
            "layout": self.layout,
            "excluded": self.excluded,
            "_source": None,
            "_features": None,
        }

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
        return self._source[self._local(index)]

    def __getitem__(self, index: int) -> dict:
        raw = self.raw(index)
        ex = self._features.deserialize_example_np(raw)
        ex["latents"] = from_storage(ex["latents"])
        for k in ("caption", "sample_id", "source_id"):
            if isinstance(ex[k], bytes):
                ex[k] = ex[k].decode()
        return ex


def scan_records(ds_dir: str) -> list[dict]:
    reader = RecordReader(ds_dir)
    out = []
    for i in range(len(reader)):
        ex = reader[i]
        out.append({"sample_id": ex["sample_id"], "bucket_id": int(ex["bucket_id"]), "text_len": int(ex["text_len"])})
    return out


def resolve_dataset(path: str) -> str:
    """The finished dataset directory `path` names: the dataset itself (it holds index.json), or
    the `--out` directory `prepare` was given (the one finished dataset under it,
    `<out>/<name>/<version>/`). Errors say what was found and which path to use."""
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
        return path
    finished = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", "*", INDEX_FILE)))
    if len(finished) == 1:
        return finished[0]
    if finished:
        raise ValueError(f"{path} holds {len(finished)} prepared datasets ({', '.join(finished)}): name one of them")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"dataset {path} does not exist: no finished mugv_data dataset ({INDEX_FILE}) there; give "
            f"the directory `python -m mugv_data prepare --out` wrote"
        )
    unfinished = sorted(glob.glob(os.path.join(path, "*", VERSION))) or ([path] if shard_files_in(path) else [])
    hint = (
        f"{', '.join(unfinished)} has no {INDEX_FILE}: its `prepare` did not finish (run it again)"
        if unfinished
        else f"no {INDEX_FILE} in it or in {os.path.join(path, '<name>', VERSION)}"
    )
    raise FileNotFoundError(f"{path} is not a finished mugv_data dataset directory: {hint}")


def shard_files_in(ds_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ds_dir, "*.array_record-*-of-*")))


def read_index(ds_dir: str) -> dict:
    path = os.path.join(ds_dir, INDEX_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: not a finished mugv_data dataset directory")
    with open(path) as f:
        return json.load(f)
