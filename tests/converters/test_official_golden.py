"""Golden files in the official trainer's layouts (tests/golden/official/, made once by its
make.py from the official code's rules): our readers take them and our writers reproduce them
tensor for tensor.

* legacy_te / legacy_local: hf2mcore's TP 2 files (with and without `--use-te`), float32, with
  the null caption `context_embedder.drop_emb` hf2mcore always writes.
* torch_dist_te: a TP 2 training checkpoint of the TE-spec trainer (bf16 weights, drop_emb, TE
  `_extra_state` objects, Megatron-LM `args` and RNG, the EMA in the flattened layout
  [L, tp_row, tp_col, shard numel] that ema_restore.py reads).
* torch_dist_local: the local-spec trainer's re-save, no optimizer state.
"""

import os

import numpy as np
import pytest
import torch

from converters import cli
from converters.convert import convert, open_checked, verify
from converters.formats.megatron import LegacyReader
from mugv.io import megatron as save_dir
from mugv.io import null_text as null_lib
from mugv.io.spec import open_reader
from mugv.io.torch_dist import EMA_PREFIX, NULL_TEXT_KEY, TorchDistReader, read_metadata
from mugv.io.weights import open_weights

OFFICIAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "official")


def golden(name: str) -> str:
    """A golden file, or the save directory (`checkpoints/`) of a golden checkpoint."""
    path = os.path.join(OFFICIAL, name)
    return os.path.join(path, "checkpoints") if os.path.isdir(path) else path


@pytest.fixture(scope="module")
def release():
    return {k: v.numpy() for k, v in torch.load(golden("dit.pt"), weights_only=True).items()}


@pytest.fixture(scope="module")
def null():
    return torch.load(golden("y_embedding.pt"), weights_only=True).numpy()


def _bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).float().numpy()


@pytest.mark.parametrize("spec", ["te", "local"])
def test_hf2mcore_files_are_read_exactly_with_their_null_caption(release, null, spec):
    reader = LegacyReader(golden(f"legacy_{spec}"))
    got = dict(reader.items())
    assert set(got) == set(release)
    assert all(got[n].dtype == np.float32 and np.array_equal(got[n], release[n]) for n in release)
    held, where = reader.null_text()
    assert np.array_equal(held, null) and NULL_TEXT_KEY in where
    extra = [k for k in reader.skipped if k.endswith("_extra_state")]
    assert len(extra) == (2 * 8 + 1 if spec == "te" else 0)


@pytest.mark.parametrize("spec", ["te", "local"])
def test_official_torch_dist_is_read_with_its_null_caption(release, null, spec):
    reader = TorchDistReader(golden(f"torch_dist_{spec}"))
    got = dict(reader.items())
    assert set(got) == set(release)
    assert all(np.array_equal(got[n].astype(np.float32), _bf16(release[n])) for n in release)
    assert np.array_equal(reader.null_text()[0], _bf16(null))
    assert reader.stored_config is None  # Megatron-LM's common.pt: the config comes from the shapes


def test_the_official_ema_layout_is_read_with_weights_ema(tmp_path):
    """Was `too many values to unpack` (config detection on the flattened shapes)."""
    ema = {k: v.numpy() for k, v in torch.load(golden("ema.pt"), weights_only=True).items()}
    got = dict(open_reader(f"megatron:{golden('torch_dist_te')}", weights="ema").items())
    assert set(got) == set(ema) and all(np.array_equal(got[n], ema[n]) for n in ema)
    out = str(tmp_path / "ema.safetensors")
    src = f"megatron:{golden('torch_dist_te')}"
    assert cli.main(["convert", "--src", src, "--weights", "ema", "--dst", f"release:{out}", "--quiet"]) == 0
    assert verify(golden("ema.pt"), out).equal
    # The official checkpoint's null caption went with it, as the release sidecar.
    assert os.path.isfile(null_lib.sidecar_path(out))
    # A run's `config.init_from=megatron:… init_weights=ema` reads it the same way.
    reader, config, _ = open_checked(src)
    reader.close()
    started = open_weights(src, model=config, weights="ema")
    assert set(started) == set(ema) and all(np.array_equal(started[n], ema[n]) for n in ema)


def test_our_legacy_writer_reproduces_hf2mcore(release, null, tmp_path):
    src = str(tmp_path / "dit.safetensors")
    convert(golden("dit.pt"), f"release:{src}")
    null_lib.save(null_lib.sidecar_path(src), null, source="y_embedding.pt")
    convert(src, f"megatron-legacy:{tmp_path / 'ours'}", tp=2)
    theirs = save_dir.rank_dirs(save_dir.iter_dir(golden("legacy_te"), 1))
    ours = save_dir.rank_dirs(save_dir.iter_dir(str(tmp_path / "ours"), 1))
    assert set(theirs) == set(ours) == {(0, 0), (1, 0)}
    for rank, d in theirs.items():
        a = torch.load(os.path.join(d, save_dir.LEGACY_FILE), weights_only=True)["model"]
        b = save_dir.MegatronFile(os.path.join(ours[rank], save_dir.LEGACY_FILE))
        b_model = b.obj["model"]
        tensors = {k for k, v in a.items() if v is not None}
        assert tensors == set(b_model), tensors ^ set(b_model)
        for k in tensors:
            assert np.array_equal(b.array(b_model[k], k), a[k].numpy()), (rank, k)


def _stored(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of a torch_dist checkpoint, by DCP key, as stored."""
    reader = TorchDistReader(directory)
    keys = [k for k, m in read_metadata(reader.dir).state_dict_metadata.items() if hasattr(m, "chunks")]
    return {k: reader.read_stored(k) for k in keys}


def _objects(directory: str) -> set[str]:
    reader = TorchDistReader(directory)
    return {k for k, m in read_metadata(reader.dir).state_dict_metadata.items() if not hasattr(m, "chunks")}


def test_our_torch_dist_writer_reproduces_the_official_training_checkpoint(tmp_path):
    """The official checkpoint through our reader and writer (`--ema-layout official --tp 2`):
    the same tensors under the same keys, shapes and dtypes, bit for bit, and every object the
    official TE-spec model asks for (the `_extra_state`s, per-(PP, TP) `rng_state`)."""
    out = str(tmp_path / "ours")
    convert(f"megatron:{golden('torch_dist_te')}", f"megatron:{out}@3", tp=2, ema_layout="official", workers=1)
    theirs, ours = _stored(golden("torch_dist_te")), _stored(out)
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    assert any(k.startswith(EMA_PREFIX + "decoder.layers.") and v.ndim == 4 for k, v in ours.items())
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert np.array_equal(ours[k].view(np.uint8), v.view(np.uint8)), k
    extra = {k for k in _objects(golden("torch_dist_te")) if "_extra_state" in k}
    assert extra and extra <= _objects(out)
    # The local spec's objects are a subset of the TE spec's: one checkpoint serves both.
    assert {k for k in _objects(golden("torch_dist_local")) if "_extra_state" in k} <= _objects(out)


def test_the_null_caption_travels_through_every_megatron_format(null, tmp_path):
    """legacy (hf2mcore) → torch_dist → legacy → release: `drop_emb` bit for bit at each step,
    the release output's as its sidecar."""
    td, lg, rel = str(tmp_path / "td"), str(tmp_path / "lg"), str(tmp_path / "w.safetensors")
    convert(f"megatron-legacy:{golden('legacy_local')}", f"megatron:{td}")
    assert np.array_equal(TorchDistReader(td).null_text()[0], null)
    convert(f"megatron:{td}", f"megatron-legacy:{lg}", tp=2)
    assert np.array_equal(LegacyReader(lg).null_text()[0], null)
    for d in save_dir.rank_dirs(save_dir.iter_dir(lg, 1)).values():
        f = save_dir.MegatronFile(os.path.join(d, save_dir.LEGACY_FILE))
        assert np.array_equal(f.array(f.obj["model"][NULL_TEXT_KEY], NULL_TEXT_KEY), null)
    r = convert(f"megatron-legacy:{lg}", f"release:{rel}")
    assert r.null_text == null_lib.sidecar_path(rel) and np.array_equal(null_lib.load(r.null_text), null)
