"""mugv.data.procedural, mugv_data.text and the `prepare` CLI end to end (procedural source)."""

import json
import os

import numpy as np
import pytest
from absl import flags

from mugv.data import procedural, shards
from mugv.data.loader import ShardLoader
from mugv_data.__main__ import main
from mugv_data.text import HashingTextEncoder, MiniLMEncoder, null_features
from tests.helpers import snapshot


def test_procedural_is_deterministic_and_matches_its_caption():
    a = list(procedural.generate(6, seed=3))
    b = list(procedural.generate(6, seed=3))
    assert all(np.array_equal(x.frames, y.frames) and x.caption == y.caption for x, y in zip(a, b))
    assert not np.array_equal(a[0].frames, next(procedural.generate(1, seed=4)).frames)
    clip = procedural.make_clip(0, seed=0, num_frames=17, size=32)
    assert clip.frames.shape == (17, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.caption == f"a {clip.colour} {clip.shape} moving {clip.direction}"
    # The object's centre of mass moves the named way.
    colour = np.array(procedural.COLOURS[clip.colour])

    def centre(f):
        ys, xs = np.nonzero(np.all(f == colour, axis=-1))
        return ys.mean(), xs.mean()

    (y0, x0), (y1, x1) = centre(clip.frames[0]), centre(clip.frames[-1])
    dy, dx = procedural.DIRECTIONS[clip.direction]
    assert np.sign(round(y1 - y0)) == dy and np.sign(round(x1 - x0)) == dx


def test_supersampled_shapes_have_area_coverage_edges_and_the_same_draw():
    for index in range(12):
        hard = procedural.make_clip(index, seed=7)
        soft = procedural.make_clip(index, seed=7, supersample=4)
        assert (soft.caption, soft.colour, soft.shape) == (hard.caption, hard.colour, hard.shape)
        bg, fg = hard.frames[0, 0, 0].astype(np.float32), np.array(procedural.COLOURS[hard.colour], np.float32)

        # Per pixel: coverage = where the colour sits between background and object colour.
        def coverage(frames):
            c = ((frames.astype(np.float32) - bg) @ (fg - bg)) / float((fg - bg) @ (fg - bg))
            return np.clip(c, 0.0, 1.0)

        # Point sampling gives only background and object pixels; area sampling adds partial
        # pixels on the edges of a circle or triangle (a square's edges fall on pixel
        # boundaries along its motion, and within a pixel of them across it).
        assert set(np.round(coverage(hard.frames), 3).ravel()) <= {0.0, 1.0}
        cov = coverage(soft.frames)
        partial = (cov > 0.05) & (cov < 0.95)
        if hard.shape != "square":
            assert partial.mean() > 0.004, (index, hard.shape)
        # Same shape, same place: covered area (∑ coverage) within 4 % of the point-sampled
        # area, and the centre of mass within 0.6 px in every frame (point sampling with inclusive
        # edges can gain a whole row on one side: up to half a pixel of shift).
        yy, xx = np.mgrid[0:32, 0:32]
        for f in range(0, 17, 4):
            a, b = coverage(hard.frames[f]), cov[f]
            assert abs(b.sum() - a.sum()) <= 0.04 * a.sum(), (index, f, a.sum(), b.sum())
            for g in (yy, xx):
                assert abs((a * g).sum() / a.sum() - (b * g).sum() / b.sum()) < 0.6
    with pytest.raises(ValueError, match="supersample"):
        procedural.make_clip(0, supersample=0)


def test_hashing_encoder_is_deterministic_with_prefix_masks():
    enc = HashingTextEncoder(dim=8, max_length=6)
    f1, m1 = enc.encode(["a red square moving left", "", "one two three four five six seven"])
    f2, _ = HashingTextEncoder(dim=8, max_length=6).encode(["a red square moving left"])
    assert np.array_equal(f1[0], f2[0])
    assert m1.tolist() == [[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert not np.any(f1[1, 1:])


def test_minilm_encoder_loads_offline():
    enc = MiniLMEncoder(max_length=16)
    assert enc.dim == 384
    feats, mask = enc.encode(["a red square moving left", "a blue circle moving up"])
    assert feats.shape == (2, 16, 384) and mask.dtype == np.int32
    n = mask.sum(1)
    assert n.tolist() == [7, 7]  # [CLS] + 5 words + [SEP]
    assert np.all(mask[:, :7] == 1) and not np.any(feats[:, 7:])
    assert np.abs(feats[0, 1:6] - feats[1, 1:6]).max() > 0.1
    nf, nm = null_features(enc)
    assert nf.shape == (16, 384) and nm.sum() == 2  # [CLS][SEP]


def test_prepare_cli_procedural(tmp_path):
    flags.FLAGS.mark_as_parsed()
    out = str(tmp_path / "data")
    args = [
        "prepare",
        "--videos=builtin:procedural",
        f"--out={out}",
        "--vae=patch-mean",
        "--text-encoder=hashing",
        "--text-len=10",
        "--procedural-count=10",
        "--buckets=17x32x32",
        "--batch-size=4",
        "--num-shards=2",
    ]
    main(args)
    ds = shards.dataset_dir(out)
    index = shards.read_index(ds)
    assert index["num_examples"] == 10 and index["buckets"] == [[3, 4, 4]]
    assert index["pixel_buckets"] == [[17, 32, 32]] and index["text_encoder"].startswith("hashing")
    null = np.load(os.path.join(out, "null_text.npz"))
    assert null["y"].shape == (10, 64) and null["mask"].sum() == 1
    captions = {shards.RecordReader(ds)[i]["caption"] for i in range(10)}
    assert all(c.startswith("a ") and " moving " in c for c in captions)
    b = next(ShardLoader(ds, 5, text_len=10))
    assert b["latents"].shape == (5, 24, 3, 4, 4) and b["y"].shape == (5, 1, 10, 64)
    main(args)  # a second run reuses the finished dataset
    assert json.load(open(os.path.join(ds, "index.json"))) == index
    # Another text length into the same --out: refused, naming the difference, nothing changed
    # (it used to keep the old shards and rewrite the null/negative caption files).
    before = snapshot(out)
    other = [a if not a.startswith("--text-len") else "--text-len=12" for a in args]
    with pytest.raises(SystemExit, match="text_len: 10 there, 12 now.*--force"):
        main(other)
    assert snapshot(out) == before
    main(other + ["--force"])  # rebuilt whole
    rebuilt = shards.read_index(ds)
    assert rebuilt["recipe"]["text_len"] == 12 and np.load(os.path.join(out, "null_text.npz"))["y"].shape == (12, 64)
    assert sorted(os.listdir(out)) == ["mugv_clips", "negative_text.npz", "null_text.npz"]  # the old one gone


def test_loader_side_imports_no_jax():
    import subprocess
    import sys

    code = (
        "import sys, mugv.data.loader, mugv.data.shards, mugv_data.reference_format, mugv_data.clips, "
        "mugv.data.procedural, mugv_data.text, mugv.data.bundled, mugv_data.encode, mugv_data.scorers, "
        "mugv_data.prepare; "
        "print(sorted(m for m in ('jax', 'torch', 'tensorflow') if m in sys.modules))"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
