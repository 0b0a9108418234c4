"""A grain loader over mugv_data shards: bucketed, seeded, per-host sharded, resumable.

Batch plan (a pure function of (seed, epoch), identical on every host):
  * each bucket's record ids are permuted with a generator seeded by (seed, epoch, bucket) and cut
    into global batches of that bucket's batch size (the remainder is dropped);
  * the batches of all buckets are permuted with (seed, epoch).
Global step s is batch s mod N of epoch s div N. Host p of P reads items [p·b/P, (p+1)·b/P) of
each global batch, so every host is in the same bucket at every step (one compiled shape per step)
and the hosts together read exactly the global batch.

Batch s is a pure function of s, so the iterator's state is just {"step": s, ...}: resuming builds
the grain pipeline from step s and yields the identical next batch, with or without workers.

Damaged data is never used silently:
* at open every shard file the index names must be there with its recorded size (and, with
  `verify=True`, its recorded CRC-32); a bad one is refused naming the file, or with
  `on_bad_shard="exclude"` left out with a loud warning naming it and the records lost;
* a record whose bytes do not decode is skipped, logged with its file as it happens, and replaced
  by the next readable record of the same bucket in that epoch's order (deterministically, so
  resumption is still exact); `skipped` counts them (the run logs it as `data/skipped_records`),
  `skipped_records` names the first few, and more than `max_skipped` stop the run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Mapping

import numpy as np

from mugv.data.shards import BadShard, RecordReader, check_shards, read_index, resolve_dataset

log = logging.getLogger("mugv.data")
_MAX_REPORTED = 32
ON_BAD_SHARD = ("refuse", "exclude")


class TooManySkipped(RuntimeError):
    """More unreadable records than the run allows (`max_skipped`)."""


def check_text_len(index: dict, ds_dir: str, text_len: int, truncate: bool) -> int:
    """How many captions of the dataset are longer than `text_len` tokens. More than none is
    refused unless `truncate` (then they are cut, and the count is logged): a shorter text length
    than the data was prepared with must not cut captions silently."""
    lens = index.get("text_lens")
    prepared = (index.get("dit_overrides") or {}).get("max_text_tokens")
    if lens is not None:
        longer, longest = sum(n > text_len for n in lens), max(lens, default=0)
    elif prepared is not None and prepared > text_len:  # an index from before text_lens: its bound
        longer, longest = None, prepared
    else:
        return 0
    if not longer and longer is not None:
        return 0
    what = f"{longer} of {len(lens)} captions" if longer is not None else "captions"
    where = f"{what} in {ds_dir} have more than text_len={text_len} tokens (up to {longest}"
    where += f"; prepared with --text-len={prepared})" if prepared is not None else ")"
    if not truncate:
        raise ValueError(
            f"{where}: set config.data.text_len={longest} (and config.model_overrides.max_text_tokens), "
            f"or config.data.truncate_captions=True to cut them to {text_len} tokens"
        )
    log.warning("%s: cut to %d tokens (config.data.truncate_captions)", where, text_len)
    return longer or 0


@dataclasses.dataclass(frozen=True)
class LatentBucket:
    """Duck-compatible with mugv.data.synthetic.Bucket (latent units, global batch size)."""

    frames: int
    height: int
    width: int
    batch_size: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)


class BatchPlan:
    def __init__(self, bucket_ids: np.ndarray, batch_sizes: Mapping[int, int], seed: int, shuffle: bool):
        self.bucket_ids, self.batch_sizes, self.seed, self.shuffle = bucket_ids, dict(batch_sizes), seed, shuffle
        self.members = {b: np.nonzero(bucket_ids == b)[0] for b in self.batch_sizes}
        self.batches_per_epoch = sum(len(m) // self.batch_sizes[b] for b, m in self.members.items())
        if self.batches_per_epoch == 0:
            counts = {b: len(m) for b, m in self.members.items()}
            raise ValueError(f"no bucket has a full batch: records per bucket {counts}, batch sizes {self.batch_sizes}")

    @functools.lru_cache(maxsize=4)  # noqa: B019 -- one sampler per run; the cache holds its last epochs
    def epoch(self, e: int) -> tuple[list[tuple[int, np.ndarray]], dict[int, np.ndarray]]:
        """[(bucket, record ids)] batches in order, and each bucket's permuted ids (for refills)."""
        orders, batches = {}, []
        for b in sorted(self.members):
            ids = self.members[b]
            if self.shuffle:
                ids = ids[np.random.default_rng([self.seed, e, b]).permutation(len(ids))]
            orders[b] = ids
            bs = self.batch_sizes[b]
            batches += [(b, ids[i * bs : (i + 1) * bs]) for i in range(len(ids) // bs)]
        if self.shuffle:
            batches = [batches[i] for i in np.random.default_rng([self.seed, e]).permutation(len(batches))]
        return batches, orders

    def batch(self, step: int) -> tuple[int, np.ndarray, np.ndarray]:
        e, i = divmod(step, self.batches_per_epoch)
        batches, orders = self.epoch(e)
        b, ids = batches[i]
        return b, ids, orders[b]


class _LoadBatch:
    """step → host-local batch dict. Picklable for grain worker processes."""

    def __init__(
        self,
        ds_dir: str,
        plan: BatchPlan,
        text_len: int,
        process_index: int,
        process_count: int,
        files: dict[str, int] | None = None,
        exclude=(),
    ):
        self.reader = RecordReader(ds_dir, files, exclude)
        self.plan, self.text_len = plan, text_len
        self.process_index, self.process_count = process_index, process_count

    def _read(self, idx: int):
        try:
            return self.reader[int(idx)], None
        except Exception as e:  # any decode failure of one record is that record's problem
            where = self.reader.locate(int(idx))
            return None, f"record {int(idx)} ({where}): {type(e).__name__}: {str(e)[:200] or 'no message'}"

    def __call__(self, step: int) -> dict:
        bucket, ids, order = self.plan.batch(int(step))
        n = len(ids) // self.process_count
        mine = ids[self.process_index * n : (self.process_index + 1) * n]
        # Refills come from the bucket's order after this batch's last item, cyclically.
        pos = int(np.nonzero(order == ids[-1])[0][0]) + 1
        examples, skipped = [], []
        for idx in mine:
            ex, err = self._read(idx)
            tries = 0
            while ex is None:
                skipped.append(err)
                if tries >= len(order):
                    raise RuntimeError(
                        f"no readable record left in bucket {bucket} of {self.reader.ds_dir}; last error: {err}. "
                        f"Check the shard files with --config.data.verify=true"
                    )
                idx = order[(pos + tries) % len(order)]
                tries += 1
                ex, err = self._read(idx)
            pos += tries
            examples.append(ex)
        return self._collate(examples, bucket, step, skipped)

    def _collate(self, examples, bucket, step, skipped) -> dict:
        L = self.text_len
        shapes = {ex["latents"].shape for ex in examples}
        if len(shapes) != 1:
            raise ValueError(
                f"bucket {bucket} at step {step} mixes latent shapes {sorted(shapes)} in {self.reader.ds_dir}"
            )
        d = examples[0]["text"].shape[1]
        y = np.zeros((len(examples), 1, L, d), np.float32)
        mask = np.zeros((len(examples), L), np.int32)
        for i, ex in enumerate(examples):
            n = min(int(ex["text_len"]), L)
            y[i, 0, :n] = ex["text"][:n]
            mask[i, :n] = 1
        return {
            "latents": np.stack([ex["latents"] for ex in examples]).astype(np.float32, copy=False),
            "y": y,
            "mask": mask,
            "fps": np.array([ex["fps"] for ex in examples], np.float32),
            "bucket_id": np.full((len(examples),), bucket, np.int32),
            "_skipped": skipped,
        }


class ShardLoader:
    """Iterator over host-local batches; `get_state`/`set_state` JSON-able (checkpoint with the model).

    batch_size: one int for every bucket, or {bucket_id: global batch size}; buckets left out of
    the mapping are not read. text_len: the padded caption length L of `y`/`mask`; a dataset
    with longer captions is refused unless `truncate_text` (they are then cut to L). `ds_dir`
    may be the dataset or the `--out` directory `prepare` wrote it under.
    """

    def __init__(
        self,
        ds_dir: str,
        batch_size: int | Mapping[int, int],
        *,
        text_len: int,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        num_workers: int = 0,
        start_step: int = 0,
        truncate_text: bool = False,
        verify: bool = False,
        on_bad_shard: str = "refuse",
        max_skipped: int | None = None,
    ):
        ds_dir = resolve_dataset(ds_dir)
        index = read_index(ds_dir)
        self.truncated_captions = check_text_len(index, ds_dir, text_len, truncate_text)
        self.ds_dir, self.text_len, self.seed, self.num_workers = ds_dir, text_len, seed, num_workers
        self.max_skipped = max_skipped
        shapes = index["buckets"]
        bucket_ids = np.asarray(index["bucket_ids"], np.int64)
        files = {n: int(f["records"]) for n, f in index["files"].items()} if "files" in index else None
        excluded = self._check_files(index, verify, on_bad_shard)
        first = 0
        for name, count in (files or {}).items():
            if name in excluded:
                bucket_ids[first : first + count] = -1  # planned into no batch
            first += count
        if isinstance(batch_size, int):
            present = sorted(b for b in set(bucket_ids.tolist()) if b >= 0)
            batch_size = {b: batch_size for b in present}
        for b, bs in batch_size.items():
            if not 0 <= b < len(shapes):
                raise ValueError(f"bucket {b} not in {ds_dir}/index.json (has {len(shapes)} buckets)")
            if bs % process_count:
                raise ValueError(f"bucket {b}: global batch size {bs} not divisible by process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
        self.plan = BatchPlan(bucket_ids, batch_size, seed, shuffle)
        self.buckets = [LatentBucket(*shapes[b], batch_size=bs) for b, bs in sorted(batch_size.items())]
        self.latent_channels, self.text_dim = index["latent_channels"], index["text_dim"]
        self._load = _LoadBatch(ds_dir, self.plan, text_len, process_index, process_count, files, excluded)
        self.step = start_step
        self.skipped = 0
        self.skipped_records: list[str] = []
        self._it = None

    def _check_files(self, index: dict, verify: bool, on_bad_shard: str) -> set[str]:
        """The shard files to leave out (none unless `on_bad_shard="exclude"`); raises BadShard."""
        if on_bad_shard not in ON_BAD_SHARD:
            raise ValueError(f"config.data.on_bad_shard must be one of {ON_BAD_SHARD}, got {on_bad_shard!r}")
        bad = check_shards(self.ds_dir, index, verify=verify)
        if not bad:
            return set()
        records = {n: int(index["files"][n]["records"]) for n in bad if n in index.get("files", {})}
        listing = "\n  ".join(f"{p} ({records.get(n, '?')} records)" for n, p in bad.items())
        if on_bad_shard == "refuse":
            raise BadShard(
                f"dataset {self.ds_dir}: {len(bad)} shard file(s) differ from its index.json:\n  {listing}\n"
                f"Rebuild the dataset (python -m mugv_data prepare ... --force), restore the files, or train "
                f"without them: --config.data.on_bad_shard=exclude"
            )
        log.error(
            "\n%s\nDATA EXCLUDED: dataset %s: %d shard file(s) left out, %d records lost:\n  %s\n%s",
            "=" * 100,
            self.ds_dir,
            len(bad),
            sum(records.values()),
            listing,
            "=" * 100,
        )
        return set(bad)

    def _make_iter(self):
        import grain

        ds = grain.MapDataset.range(self.step, sys.maxsize).map(self._load).to_iter_dataset()
        if self.num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make_iter()
        batch = next(self._it)
        self.step += 1
        skipped = batch.pop("_skipped")
        for what in skipped:
            self.skipped += 1
            log.warning(
                "step %d: skipped unreadable %s; replaced by the next readable record of its bucket (%d so far)",
                self.step - 1,
                what,
                self.skipped,
            )
        self.skipped_records.extend(skipped[: max(0, _MAX_REPORTED - len(self.skipped_records))])
        if self.max_skipped is not None and self.skipped > self.max_skipped:
            raise TooManySkipped(
                f"dataset {self.ds_dir}: {self.skipped} unreadable records skipped, more than "
                f"config.data.max_skipped_records={self.max_skipped} (first: {self.skipped_records[:3]}); "
                f"check the files with --config.data.verify=true"
            )
        return batch

    def get_state(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "skipped": self.skipped,
            "skipped_records": list(self.skipped_records),
        }

    def set_state(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has {self.seed}")
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.skipped_records = list(state.get("skipped_records", []))
        self._it = None

    def close(self) -> None:
        self._it = None


class MixedLoader:
    """Draws each batch from one of several loaders (datasets or training stages) by weight.

    `weights`: a sequence of non-negative floats, one per loader, or a callable step → such a
    sequence (a curriculum, e.g. annealing the image:video ratio). The loader used at step s is
    drawn from a generator seeded by (seed, s), so the choice is a pure function of the step: a
    resumed run makes the same choices, and each child resumes from its own state. Children need
    `__next__`, `get_state` and `set_state` (ShardLoader, mugv.data.synthetic.DataIterator).
    """

    def __init__(self, loaders, weights, seed: int = 0):
        self.loaders = list(loaders)
        if not self.loaders:
            raise ValueError("MixedLoader needs at least one loader")
        self.weights, self.seed, self.step = weights, int(seed), 0
        self.counts = [0] * len(self.loaders)
        self.last_index: int | None = None
        for attr in ("latent_channels", "text_dim", "returns_local"):
            values = {getattr(l, attr) for l in self.loaders if hasattr(l, attr)}
            if len(values) > 1:
                raise ValueError(f"MixedLoader children disagree on {attr}: {sorted(map(str, values))}")
            if values:
                setattr(self, attr, values.pop())

    def probabilities(self, step: int) -> np.ndarray:
        w = self.weights(step) if callable(self.weights) else self.weights
        w = np.asarray(w, np.float64)
        if w.shape != (len(self.loaders),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(
                f"mixing weights at step {step} must be {len(self.loaders)} finite non-negative "
                f"floats with a positive sum, got {w.tolist()}"
            )
        return w / w.sum()

    def choose(self, step: int) -> int:
        p = self.probabilities(step)
        u = np.random.default_rng([self.seed, step]).random()
        return int(min(np.searchsorted(np.cumsum(p), u, side="right"), len(p) - 1))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        i = self.choose(self.step)
        batch = next(self.loaders[i])
        self.step += 1
        self.counts[i] += 1
        self.last_index = i
        return batch

    @property
    def skipped(self) -> int:
        return sum(int(getattr(l, "skipped", 0)) for l in self.loaders)

    def get_state(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "counts": list(self.counts),
            "loaders": [l.get_state() for l in self.loaders],
        }

    def set_state(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"mixed loader state was saved with seed {state['seed']}, this one has {self.seed}")
        if len(state["loaders"]) != len(self.loaders):
            raise ValueError(
                f"mixed loader state has {len(state['loaders'])} children, this one has {len(self.loaders)}"
            )
        self.step = int(state["step"])
        self.counts = [int(c) for c in state.get("counts", [0] * len(self.loaders))]
        for l, s in zip(self.loaders, state["loaders"]):
            l.set_state(s)

    def close(self) -> None:
        for l in self.loaders:
            if hasattr(l, "close"):
                l.close()
