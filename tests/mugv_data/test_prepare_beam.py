"""`prepare` on Apache Beam (DirectRunner, 2 worker processes) writes the same dataset as the
one-process path: same records in the same order, same index, same manifest (dedup is global)."""

import json
import os
import shutil

import numpy as np
from absl import flags

from mugv.data import shards
from mugv_data.__main__ import main
from tests.mugv_data.test_clips import _write_mp4, textured_scene


def _videos(root):
    os.makedirs(root)
    for i in range(3):
        # two shots per video, of 16 and 12 frames: they land in two different buckets
        _write_mp4(f"{root}/v{i}.mp4", np.concatenate([textured_scene(5 + i, 16), textured_scene(6 + i, 12)]), 8)
    shutil.copy(f"{root}/v0.mp4", f"{root}/v3_copy.mp4")  # near-duplicates of v0's shots
    with open(f"{root}/v4_corrupt.mp4", "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4)


def test_beam_direct_runner_matches_the_one_process_path(tmp_path):
    flags.FLAGS.mark_as_parsed()
    _videos(str(tmp_path / "videos"))
    common = [
        f"--videos={tmp_path / 'videos'}",
        "--vae=patch-mean",
        "--text-encoder=hashing",
        "--text-len=8",
        "--buckets=16x32x32,8x48x48",
        "--batch-size=2",
        "--num-shards=2",
        "--min-seconds=1",
        "--aes-suffix=6.0",
        "--uncaptioned=empty",  # the videos have no captions (issue 25: refused by default)
    ]
    main(["prepare", f"--out={tmp_path / 'seq'}", *common])
    main(["prepare", f"--out={tmp_path / 'beam'}", "--beam-runner=DirectRunner", "--beam-workers=2", *common])
    seq, beam = shards.dataset_dir(str(tmp_path / "seq")), shards.dataset_dir(str(tmp_path / "beam"))

    index = shards.read_index(seq)
    # Serialized records may order the tf.Example map differently (below), so the files' CRC-32s
    # may differ; their names, sizes and record counts may not.
    no_crc = lambda ix: {
        **ix,
        "files": {n: {k: v for k, v in f.items() if k != "crc32"} for n, f in ix["files"].items()},
    }
    assert no_crc(index) == no_crc(shards.read_index(beam))
    # 3 videos × 2 shots; the copy's shots are duplicates and the corrupt file is skipped.
    assert index["sample_ids"] == [f"v{i}.mp4#{k:04d}" for i in range(3) for k in range(2)]
    assert index["bucket_ids"] == [0, 1] * 3 and index["latent_dtype"] == "bfloat16"
    ra, rb = shards.RecordReader(seq), shards.RecordReader(beam)
    assert len(ra) == len(rb) == 6
    for i in range(6):
        a, b = ra[i], rb[i]
        # Serialized bytes may differ in the order of the tf.Example map; the content may not.
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), i
        assert a["caption"].endswith(" aesthetic score: 6.0.")

    with open(tmp_path / "seq" / "manifest.jsonl") as f:
        manifest = f.read()
    with open(tmp_path / "beam" / "manifest.jsonl") as f:
        assert f.read() == manifest
    recs = [json.loads(line) for line in manifest.splitlines()]
    reasons = {(r["video"], r["clip_id"]): r["reason"] for r in recs}
    assert reasons[("v3_copy.mp4", "v3_copy.mp4#0000")] == "near_duplicate"
    assert reasons[("v3_copy.mp4", "v3_copy.mp4#0001")] == "near_duplicate"
    assert reasons[("v4_corrupt.mp4", None)] == "decode_error"
    assert sum(r["kept"] for r in recs) == 6
