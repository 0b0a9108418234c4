"""mugv_data.encode/shards/loader: exact round trip, idempotent and crash-safe writes, bucketed
batches, per-host slices, mid-epoch resume, and skip-and-count of an unreadable record."""

import os
import shutil

import numpy as np
import pytest
from absl import flags

from mugv.data import procedural, shards
from mugv.data.loader import ShardLoader
from mugv_data import encode
from mugv_data.encode import ClipInput, PixelBucket
from mugv_data.text import HashingTextEncoder

BUCKETS = [PixelBucket(17, 32, 32), PixelBucket(9, 48, 48)]
BATCH = {0: 4, 1: 2}
TEXT_LEN = 12


def _clip_inputs():
    for c in procedural.generate(20, seed=1, num_frames=17, size=32):
        yield ClipInput(c.sample_id, "procedural", c.caption, c.frames, c.fps)
    for c in procedural.generate(12, seed=2, num_frames=9, size=48, fps=12.0):
        yield ClipInput(c.sample_id, "procedural", c.caption, c.frames, c.fps)


def _examples():
    lat, txt = encode.PatchMeanEncoder(), HashingTextEncoder(dim=16, max_length=TEXT_LEN)
    return list(encode.encode_clips(_clip_inputs(), BUCKETS, lat, txt, batch_size=5))


def _write(examples, out, **kw):
    return shards.write_shards(
        lambda: examples,
        str(out),
        buckets=encode.latent_buckets(BUCKETS, encode.PatchMeanEncoder()),
        latent_channels=24,
        text_dim=16,
        **kw,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    examples = _examples()
    return _write(examples, tmp_path_factory.mktemp("shards"), num_shards=3), examples


def test_encode_fits_buckets():
    lat = encode.PatchMeanEncoder()
    assert encode.latent_buckets(BUCKETS, lat) == [(3, 4, 4), (2, 6, 6)]
    assert encode.choose_bucket(17, 32, 32, BUCKETS) == 0
    assert encode.choose_bucket(9, 50, 48, BUCKETS) == 1
    assert encode.choose_bucket(8, 32, 32, BUCKETS) is None
    wide = np.zeros((17, 40, 80, 3), np.uint8)
    # The crop keeps source columns 20..60; white covers them plus the filter's 1.25 px support.
    wide[:, :, 18:62] = 255
    out = encode.resize_crop(wide, BUCKETS[0])
    assert out.shape == (17, 32, 32, 3) and out.min() > 254.9


def _bf16(x):
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_shards_round_trip_exactly(dataset):
    ds_dir, examples = dataset
    reader = shards.RecordReader(ds_dir)
    assert len(reader.files) == 3 and len(reader) == len(examples) == 32
    assert shards.read_index(ds_dir)["latent_dtype"] == "bfloat16"
    for i, ex in enumerate(examples):
        got = reader[i]
        assert got["sample_id"] == ex["sample_id"] and got["caption"] == ex["caption"]
        # bf16 storage: the float32 read-back is exactly the bf16 rounding of what was written.
        assert got["latents"].dtype == np.float32 and np.array_equal(got["latents"], _bf16(ex["latents"]))
        assert np.array_equal(got["text"], ex["text"]) and got["text"].shape == (ex["text_len"], 16)
        for k in ("text_len", "num_frames", "height", "width", "bucket_id"):
            assert int(got[k]) == int(ex[k]), k
        assert np.float32(got["fps"]) == np.float32(ex["fps"])
    index = shards.read_index(ds_dir)
    assert index["bucket_ids"] == [e["bucket_id"] for e in examples]
    assert index["buckets"] == [[3, 4, 4], [2, 6, 6]]


def test_bf16_storage_is_exact_and_half_size_and_float32_shards_still_read(dataset, tmp_path):
    import ml_dtypes

    ds_dir, examples = dataset
    # Values that bf16 holds exactly come back bit-identical; others round to nearest even.
    exact = np.array([1.0, -2.5, 0.15625, 2.0**100, -0.0, np.inf], np.float32)
    assert np.array_equal(shards.from_storage(shards.to_storage(exact, "bfloat16")), exact)
    x = np.float32(1.0) + np.float32(2.0**-9)  # halfway between two bf16 values: ties to even (1.0)
    assert shards.from_storage(shards.to_storage(np.array([x, 1 + 3 * 2.0**-9], np.float32), "bfloat16")).tolist() == [
        1.0,
        1.0 + 2.0**-7,
    ]
    already = np.array([0.3, -7.1], ml_dtypes.bfloat16)
    assert np.array_equal(shards.to_storage(already, "bfloat16"), already.view(np.uint16))
    # A float32 dataset (the old format) still reads, bit-exact.
    f32 = _write(examples, tmp_path, latent_dtype="float32")
    r32 = shards.RecordReader(f32)
    assert all(np.array_equal(r32[i]["latents"], examples[i]["latents"]) for i in range(len(examples)))
    b = next(ShardLoader(f32, BATCH, text_len=TEXT_LEN, seed=0))
    assert b["latents"].dtype == np.float32

    def size(d):  # serialized record bytes (array_record files themselves grow in 64 KiB chunks)
        r = shards.RecordReader(d)
        return sum(len(r.raw(i)) for i in range(len(r)))

    lat_bytes = sum(np.asarray(e["latents"]).nbytes for e in examples)
    # bf16 saves half of the latent bytes (text features stay float32).
    assert abs((size(f32) - size(ds_dir)) - lat_bytes / 2) < 0.02 * lat_bytes
    with pytest.raises(ValueError, match="latent_dtype"):
        _write(examples, tmp_path / "x", latent_dtype="float16")


def test_write_is_idempotent_and_crash_safe(dataset, tmp_path):
    ds_dir, examples = dataset
    before = {f: os.path.getmtime(f) for f in shards.shard_files(ds_dir)}

    def boom():
        raise AssertionError("examples must not be regenerated for a finished dataset")

    assert (
        shards.write_shards(boom, os.path.dirname(os.path.dirname(ds_dir)), buckets=[], latent_channels=24, text_dim=16)
        == ds_dir
    )
    assert {f: os.path.getmtime(f) for f in shards.shard_files(ds_dir)} == before

    def crashing():
        yield from examples[:5]
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        _write(crashing(), tmp_path)
    final = shards.dataset_dir(str(tmp_path))
    assert not os.path.exists(final)
    with pytest.raises(FileNotFoundError, match="index.json"):
        ShardLoader(final, 2, text_len=TEXT_LEN)
    assert shards.read_index(_write(examples, tmp_path))["num_examples"] == 32


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_buckets_and_epoch(dataset):
    ds_dir, examples = dataset
    loader = ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=3)
    assert [b.latent_shape for b in loader.buckets] == [(3, 4, 4), (2, 6, 6)]
    per_epoch = 20 // 4 + 12 // 2
    assert loader.plan.batches_per_epoch == per_epoch
    batches = _take(loader, per_epoch)
    seen = []
    for b in batches:
        bucket = int(b["bucket_id"][0])
        n = BATCH[bucket]
        assert b["latents"].shape == (n, 24, *loader.buckets[bucket].latent_shape)
        assert b["y"].shape == (n, 1, TEXT_LEN, 16) and b["mask"].shape == (n, TEXT_LEN)
        assert b["latents"].dtype == b["y"].dtype == b["fps"].dtype == np.float32 and b["mask"].dtype == np.int32
        # mask is a prefix and y is zero past it
        assert np.all(np.diff(b["mask"], axis=1) <= 0) and not np.any(b["y"][:, 0][b["mask"] == 0])
        assert set(b["fps"].tolist()) == {8.0 if bucket == 0 else 12.0}
        seen += [x.tobytes() for x in b["latents"]]
    # One epoch reads every record exactly once (no bucket has a remainder here).
    assert sorted(seen) == sorted(_bf16(e["latents"]).tobytes() for e in examples)
    other = _take(ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=4), 3)
    assert not all(np.array_equal(a["latents"], b["latents"]) for a, b in zip(batches, other))


def test_loader_per_host_slices_make_the_global_batch(dataset):
    ds_dir, _ = dataset
    full = _take(ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=5), 6)
    hosts = [
        _take(ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=5, process_index=p, process_count=2), 6)
        for p in range(2)
    ]
    for step in range(6):
        for k in ("latents", "y", "mask", "fps"):
            assert np.array_equal(np.concatenate([hosts[0][step][k], hosts[1][step][k]]), full[step][k])


def test_loader_resumes_mid_epoch_to_the_identical_next_batch(dataset):
    ds_dir, _ = dataset
    loader = ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=7)
    _take(loader, 7)
    state = loader.get_state()
    import json

    state = json.loads(json.dumps(state))  # what a checkpoint stores
    expected = _take(loader, 8)  # crosses into the second epoch (11 batches per epoch)
    resumed = ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=7)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 8)):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=8).set_state(state)


def test_loader_with_worker_processes_matches(dataset):
    ds_dir, _ = dataset
    ref = ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=9)
    ref.set_state({"step": 4, "seed": 9})
    mp = ShardLoader(ds_dir, BATCH, text_len=TEXT_LEN, seed=9, num_workers=2)
    mp.set_state({"step": 4, "seed": 9})
    for a, b in zip(_take(ref, 3), _take(mp, 3)):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    mp.close()


def test_loader_skips_and_counts_an_unreadable_record(dataset, tmp_path):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from array_record.python.array_record_module import ArrayRecordWriter

    ds_dir, examples = dataset
    bad_dir = str(tmp_path / "bad")
    shutil.copytree(ds_dir, bad_dir)
    first = shards.shard_files(bad_dir)[0]
    src = ArrayRecordDataSource([first])
    raw = [src[i] for i in range(len(src))]
    raw[2] = b"\x0a\xff\xff garbage, not a tf.Example"
    os.remove(first)
    w = ArrayRecordWriter(first, "group_size:1")
    for r in raw:
        w.write(r)
    w.close()
    # As if the record had been written that way: the index records the file as it now is.
    index = shards.read_index(bad_dir)
    index["files"] = shards.shard_table(bad_dir)
    from mugv.io.atomic import write_json

    write_json(os.path.join(bad_dir, shards.INDEX_FILE), index)

    loader = ShardLoader(bad_dir, BATCH, text_len=TEXT_LEN, seed=11)
    batches = _take(loader, loader.plan.batches_per_epoch)
    assert loader.skipped == 1
    assert loader.skipped_records[0].startswith(f"record 2 ({os.path.basename(first)}): DecodeError")
    assert loader.get_state()["skipped"] == 1
    bucket = examples[2]["bucket_id"]
    assert all(b["latents"].shape[0] == BATCH[int(b["bucket_id"][0])] for b in batches)
    seen = [x.tobytes() for b in batches for x in b["latents"]]
    assert _bf16(examples[2]["latents"]).tobytes() not in seen
    # the replacement is another record of the same bucket, read twice this epoch
    assert len(seen) - len(set(seen)) == 1 and bucket in (0, 1)


def _mixed(ds_dir, weights, seed=0):
    from mugv.data.loader import MixedLoader

    # Two "datasets": the same shards read as two different streams (bucket 0 only, bucket 1 only).
    return MixedLoader(
        [
            ShardLoader(ds_dir, {0: 4}, text_len=TEXT_LEN, seed=1),
            ShardLoader(ds_dir, {1: 2}, text_len=TEXT_LEN, seed=2),
        ],
        weights,
        seed=seed,
    )


def test_mixed_loader_follows_weights_and_curriculum(dataset):
    ds_dir, _ = dataset
    mixed = _mixed(ds_dir, [0.25, 0.75], seed=3)
    picks = np.array([mixed.choose(s) for s in range(4000)])
    # Binomial(4000, 0.75) has sd 0.0068 in the fraction; 0.03 is over 4 sd.
    assert abs(picks.mean() - 0.75) < 0.03
    assert picks.tolist() == [mixed.choose(s) for s in range(4000)]  # a pure function of the step
    assert picks.tolist() != [_mixed(ds_dir, [0.25, 0.75], seed=4).choose(s) for s in range(4000)]
    # A curriculum: the first 3 steps from child 0 only, then child 1 only.
    cur = _mixed(ds_dir, lambda s: [1.0, 0.0] if s < 3 else [0.0, 1.0])
    got = _take(cur, 5)
    plain0 = _take(ShardLoader(ds_dir, {0: 4}, text_len=TEXT_LEN, seed=1), 3)
    plain1 = _take(ShardLoader(ds_dir, {1: 2}, text_len=TEXT_LEN, seed=2), 2)
    for a, b in zip(got, plain0 + plain1):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert cur.counts == [3, 2] and [int(b["bucket_id"][0]) for b in got] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="step 0"):
        _mixed(ds_dir, [0.0, 0.0]).choose(0)
    with pytest.raises(ValueError, match="2 finite"):
        next(_mixed(ds_dir, [1.0]))


def test_mixed_loader_resumes_to_the_identical_next_batch(dataset):
    import json

    ds_dir, _ = dataset
    weights = lambda s: [1.0, 1.0 + s / 4]  # noqa: E731 - annealed towards child 1
    mixed = _mixed(ds_dir, weights, seed=5)
    _take(mixed, 7)
    state = json.loads(json.dumps(mixed.get_state()))
    expected = _take(mixed, 6)
    resumed = _mixed(ds_dir, weights, seed=5)
    resumed.set_state(state)
    got = _take(resumed, 6)
    assert resumed.counts == mixed.counts and sum(mixed.counts) == 13
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="seed"):
        _mixed(ds_dir, weights, seed=6).set_state(state)


# --- issue 25: data.path as prepare's --out, and no silent caption truncation ----------------


def test_loader_takes_the_directory_prepare_was_given(dataset, tmp_path):
    ds_dir, _ = dataset
    out = os.path.dirname(os.path.dirname(ds_dir))  # <out>/mugv_clips/1.0.0
    assert ShardLoader(out, BATCH, text_len=TEXT_LEN, seed=3).ds_dir == ds_dir
    with pytest.raises(FileNotFoundError, match=f"dataset {tmp_path / 'nope'} does not exist.*prepare --out"):
        ShardLoader(str(tmp_path / "nope"), 2, text_len=TEXT_LEN)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty} is not a finished .*no index.json in it or in .*1.0.0"):
        ShardLoader(str(empty), 2, text_len=TEXT_LEN)
    (empty / "mugv_clips" / "1.0.0").mkdir(parents=True)  # a prepare that did not finish
    with pytest.raises(FileNotFoundError, match="mugv_clips/1.0.0 has no index.json: its `prepare` did not finish"):
        ShardLoader(str(empty), 2, text_len=TEXT_LEN)
    two = tmp_path / "two"
    for name in ("x", "y"):
        shutil.copytree(ds_dir, two / name / "1.0.0")
    with pytest.raises(ValueError, match=r"holds 2 prepared datasets \(.*x/1.0.0, .*y/1.0.0\): name one"):
        ShardLoader(str(two), 2, text_len=TEXT_LEN)


def test_a_shorter_text_len_than_the_captions_is_refused_or_cut_with_a_count(dataset, tmp_path, caplog):
    import json

    ds_dir, examples = dataset
    lens = shards.read_index(ds_dir)["text_lens"]
    assert lens == [int(e["text_len"]) for e in examples]
    longest, short = max(lens), max(lens) - 1
    longer = sum(n > short for n in lens)
    assert longer == len(lens) == 32  # every procedural caption has 6 tokens
    ShardLoader(ds_dir, BATCH, text_len=longest)  # every caption fits
    with pytest.raises(ValueError, match=rf"{longer} of 32 captions .* more than text_len={short} tokens \(up to "):
        ShardLoader(ds_dir, BATCH, text_len=short)
    with caplog.at_level("WARNING", logger="mugv.data"):
        cut = ShardLoader(ds_dir, BATCH, text_len=short, truncate_text=True)
    assert cut.truncated_captions == longer and f"{longer} of 32 captions" in caplog.text
    assert next(cut)["mask"].sum(1).max() <= short
    # A dataset indexed before text_lens: refused by the length it was prepared with.
    old = tmp_path / "old"
    shutil.copytree(ds_dir, old)
    index = shards.read_index(str(old))
    del index["text_lens"]
    index["dit_overrides"] = {"text_dim": 16, "max_text_tokens": TEXT_LEN}
    (old / "index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=rf"captions in .* more than text_len=4 tokens .*prepared with --text-len={TEXT_LEN}"
    ):
        ShardLoader(str(old), BATCH, text_len=4)


def _broken_copy(ds_dir, tmp_path, how):
    bad_dir = str(tmp_path / how)
    shutil.copytree(ds_dir, bad_dir)
    victim = shards.shard_files(bad_dir)[1]
    if how == "deleted":
        os.remove(victim)
    elif how == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:  # garbled: same size, changed bytes inside the first records (riegeli then fails them)
        with open(victim, "r+b") as f:
            for offset in (200, 3000):
                f.seek(offset)
                chunk = f.read(16)
                f.seek(offset)
                f.write(bytes(b ^ 0x5A for b in chunk))
    return bad_dir, os.path.basename(victim)


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_missing_or_cut_shard_is_refused_naming_it_or_excluded_loudly(dataset, tmp_path, how, caplog):
    """Before: a deleted shard was replaced silently (no log line, no metric); a half-truncated one
    made the whole dataset unreadable with an error naming no file."""
    import logging

    ds_dir, _ = dataset
    bad_dir, victim = _broken_copy(ds_dir, tmp_path, how)
    records = shards.read_index(bad_dir)["files"][victim]["records"]
    with pytest.raises(shards.BadShard, match=f"(?s){victim}.*\\({records} records\\).*on_bad_shard=exclude"):
        ShardLoader(bad_dir, BATCH, text_len=TEXT_LEN, seed=11)
    with caplog.at_level(logging.WARNING, logger="mugv.data"):
        loader = ShardLoader(bad_dir, BATCH, text_len=TEXT_LEN, seed=11, on_bad_shard="exclude")
    assert "DATA EXCLUDED" in caplog.text and victim in caplog.text and f"{records} records lost" in caplog.text
    first = sum(f["records"] for n, f in shards.read_index(bad_dir)["files"].items() if n < victim)
    lost = set(range(first, first + records))
    for b in range(loader.plan.batches_per_epoch):
        _, ids, _ = loader.plan.batch(b)
        assert not lost & set(ids.tolist())
    _take(loader, loader.plan.batches_per_epoch)
    assert loader.skipped == 0


def test_changed_bytes_are_refused_when_verified_and_skipped_loudly_otherwise(dataset, tmp_path, caplog):
    import logging

    from mugv.data.loader import TooManySkipped

    ds_dir, _ = dataset
    bad_dir, victim = _broken_copy(ds_dir, tmp_path, "garbled")
    with pytest.raises(shards.BadShard, match=f"{victim}: crc32"):
        ShardLoader(bad_dir, BATCH, text_len=TEXT_LEN, seed=11, verify=True)
    loader = ShardLoader(bad_dir, BATCH, text_len=TEXT_LEN, seed=11)  # sizes match: opens
    with caplog.at_level(logging.WARNING, logger="mugv.data"):
        _take(loader, 2 * loader.plan.batches_per_epoch)
    assert loader.skipped >= 1 and "skipped unreadable record" in caplog.text and victim in caplog.text
    strict = ShardLoader(bad_dir, BATCH, text_len=TEXT_LEN, seed=11, max_skipped=0)
    with pytest.raises(TooManySkipped, match="max_skipped_records=0"):
        _take(strict, 2 * strict.plan.batches_per_epoch)
