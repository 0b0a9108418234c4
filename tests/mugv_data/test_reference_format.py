"""mugv_data.reference_format: the reference CSV + .pt layout, with `real` normalised exactly once."""

import csv

import numpy as np
import pytest
import torch
from absl import flags

from mugv.data import shards
from mugv.data.loader import ShardLoader
from mugv_data import reference_format as ref
from mugv_data.__main__ import main as mugv_data
from tests.doc_commands import doc_command

MEAN = np.array(
    [
        -0.0194091796875,
        0.09619140625,
        -0.796875,
        0.1591796875,
        -0.2578125,
        0.359375,
        -0.3203125,
        -0.287109375,
        -0.0069580078125,
        0.3046875,
        0.310546875,
        -0.451171875,
        -0.1728515625,
        0.369140625,
        0.2177734375,
        -3.075599670410156e-05,
        0.1630859375,
        -0.267578125,
        -0.1962890625,
        -0.1298828125,
        -0.28515625,
        -0.515625,
        0.5859375,
        -0.34375,
    ],
    np.float32,
)
STD = np.array(
    [
        0.8817,
        0.6523,
        0.9152,
        1.2117,
        3.3516,
        0.7528,
        0.8177,
        0.8637,
        0.9075,
        2.8875,
        0.8980,
        1.1202,
        1.0003,
        2.5163,
        0.6652,
        1.2573,
        0.7279,
        1.0777,
        1.5159,
        0.8680,
        1.1859,
        1.0484,
        2.4750,
        1.5881,
    ],
    np.float32,
)
L, D = 10, 32


def _make_reference(root):
    """Three samples written the way the reference data prep does (latents may carry a leading 1)."""
    rng = np.random.default_rng(0)
    (root / "latents").mkdir()
    (root / "text_features").mkdir()
    rows, truth = [], {}
    for i, (source, shape) in enumerate(
        [("real", (1, 24, 2, 4, 6)), ("generated", (24, 2, 4, 6)), ("real", (24, 3, 4, 4))]
    ):
        sid = f"clip{i}"
        lat = rng.standard_normal(shape).astype(np.float32) * 2 + 0.5
        n = 3 + i
        y = np.zeros((1, 1, L, D), np.float32)
        y[0, 0, :n] = rng.standard_normal((n, D))
        mask = np.zeros((1, L), bool)
        mask[0, :n] = True
        torch.save(torch.from_numpy(lat), root / "latents" / f"{sid}.pt")
        torch.save(
            {"y": torch.from_numpy(y), "mask": torch.from_numpy(mask)}, root / "text_features" / f"{sid}_text.pt"
        )
        rows.append([sid, source, f"latents/{sid}.pt", f"text_features/{sid}_text.pt"])
        raw = lat.reshape(lat.shape[-4:])
        truth[sid] = (
            (raw - MEAN[:, None, None, None]) / STD[:, None, None, None] if source == "real" else raw,
            y[0, 0, :n],
        )
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([list(ref.COLUMNS), *rows])
    return root / "train.csv", truth


def test_reference_rows_normalise_real_once(tmp_path):
    csv_path, truth = _make_reference(tmp_path)
    rows = list(ref.read_csv(str(csv_path)))
    assert [r["sample_id"] for r in rows] == ["clip0", "clip1", "clip2"]
    for r in rows:
        lat, text = truth[r["sample_id"]]
        np.testing.assert_allclose(r["latents"], lat, rtol=1e-6, atol=1e-6)
        assert np.array_equal(r["text"], text) and r["text_len"] == text.shape[0]
    # the stats are the reference's (docs/reference.md §6.5)
    assert np.array_equal(np.asarray(ref.LATENT_MEAN, np.float32), MEAN)
    assert np.array_equal(np.asarray(ref.LATENT_STD, np.float32), STD)


def test_import_to_shards_and_load(tmp_path, capsys):
    flags.FLAGS.mark_as_parsed()
    (tmp_path / "ref").mkdir()
    csv_path, truth = _make_reference(tmp_path / "ref")
    out = str(tmp_path / "out")
    mugv_data(
        doc_command("docs/data.md", "python -m mugv_data import-reference", {"train.csv": str(csv_path), "OUT": out})[
            3:
        ]
    )
    ds = capsys.readouterr().out.strip().splitlines()[-1]
    index = shards.read_index(ds)
    assert index["buckets"] == [[2, 4, 6], [3, 4, 4]] and index["bucket_ids"] == [0, 0, 1]
    r = shards.RecordReader(ds)
    for i in range(3):
        ex = r[i]
        lat, text = truth[ex["sample_id"]]
        # stored as bf16 (8 significant bits): rounding moves a value by at most 2^-8 of itself
        np.testing.assert_allclose(ex["latents"], lat, rtol=2.0**-8, atol=0)
        assert ex["height"] == ex["latents"].shape[2] * 8 and ex["fps"] == 24.0
    batch = next(ShardLoader(ds, {0: 2}, text_len=L, seed=0))
    assert batch["latents"].shape == (2, 24, 2, 4, 6) and batch["y"].shape == (2, 1, L, D)
    assert sorted(batch["mask"].sum(1).tolist()) == [3, 4]
    # And back out, from the dataset directory docs/data.md names (OUT/mugv_clips/1.0.0).
    back = tmp_path / "back"
    mugv_data(doc_command("docs/data.md", "python -m mugv_data export-reference", {"OUT": out, "DIR": str(back)})[3:])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(back / "train.csv")
    assert sorted(r["sample_id"] for r in ref.read_csv(str(back / "train.csv"))) == ["clip0", "clip1", "clip2"]


@pytest.mark.parametrize("source", ["generated", "real"])
def test_export_then_import_round_trips(tmp_path, source):
    rng = np.random.default_rng(1)
    examples = [
        {
            "sample_id": f"s{i}",
            "latents": rng.standard_normal((24, 2, 4, 4)).astype(np.float32),
            "text": rng.standard_normal((2 + i, D)).astype(np.float32),
            "text_len": 2 + i,
        }
        for i in range(2)
    ]
    csv_path = ref.write_reference(examples, str(tmp_path), source=source, text_len=L)
    back = list(ref.read_csv(csv_path))
    assert [r["source"] for r in back] == [source, source]
    for ex, r in zip(examples, back):
        if source == "generated":
            assert np.array_equal(r["latents"], ex["latents"])
        else:  # de-normalised on export, normalised on import: float32 rounding only
            np.testing.assert_allclose(r["latents"], ex["latents"], rtol=1e-5, atol=1e-5)
        assert np.array_equal(r["text"], ex["text"])
    saved = torch.load(tmp_path / "text_features" / "s0_text.pt", weights_only=True)
    assert saved["y"].shape == (1, 1, L, D) and saved["mask"].shape == (1, L)


def test_bad_reference_files_name_the_file(tmp_path):
    csv_path, _ = _make_reference(tmp_path)
    torch.save({"y": torch.zeros(1, L, D)}, tmp_path / "text_features" / "clip1_text.pt")
    with pytest.raises(ValueError, match="clip1_text.pt"):
        list(ref.read_csv(str(csv_path)))
