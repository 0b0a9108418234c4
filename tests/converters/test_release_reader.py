"""The one release reader (mugv.io.release): torch zip files without torch, memory-mapped views,
safetensors and HF shards, the torch fallback, and errors that name the file and the tensor."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mugv.io.base import BF16
from mugv.io.release import ReleaseReader

REPO = Path(__file__).resolve().parents[2]


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(6, 5, generator=g),
        "bf": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "half": torch.randn(4, generator=g).to(torch.float16),
        "transposed": torch.randn(5, 6, generator=g).T,  # strided view
        "slice": torch.arange(10, dtype=torch.int64)[2:7],  # offset into a storage
        "param": torch.nn.Parameter(torch.randn(2, 3, generator=g)),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
    }


def _same(array: np.ndarray, tensor: torch.Tensor) -> bool:
    t = tensor.detach()
    if t.dtype == torch.bfloat16:
        return array.dtype == BF16 and np.array_equal(array.view(np.int16), t.view(torch.int16).numpy())
    return array.dtype == t.numpy().dtype and np.array_equal(array, t.numpy())


def test_torch_zip_is_read_bit_exactly_and_without_torch(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "s.pt")
    with ReleaseReader(str(tmp_path / "s.pt")) as r:
        assert {n: (e.shape, e.dtype) for n, e in r.entries().items()} == {
            n: (tuple(t.shape), BF16 if t.dtype == torch.bfloat16 else t.detach().numpy().dtype)
            for n, t in state.items()
        }
        for name, array in r.items():
            assert _same(array, state[name]), name
    # The same file read in a process that never imports torch.
    code = (
        "import sys, numpy as np\n"
        "from mugv.io.release import ReleaseReader\n"
        f"r = ReleaseReader({str(tmp_path / 's.pt')!r})\n"
        "print(float(np.asarray(r.get('w'), np.float64).sum()))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(float(state["w"].double().sum()), abs=1e-9)


def test_tensors_are_copy_on_write_views_of_the_file(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"a": torch.arange(8, dtype=torch.float32)}, str(path))
    before = path.read_bytes()
    r = ReleaseReader(str(path))
    a = r.get("a")
    assert not a.flags.owndata  # a view of the mapping, not a copy
    a[:] = -1  # private pages: the checkpoint is not changed
    assert path.read_bytes() == before
    assert np.array_equal(ReleaseReader(str(path)).get("a"), np.arange(8, dtype=np.float32))


def test_pre_zip_torch_files_fall_back_to_torch(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    r = ReleaseReader(str(tmp_path / "old.pt"))
    for name, array in r.items():
        assert _same(array, state[name]), name


def test_hf_sharded_index_is_read(tmp_path):
    state = {f"t{i}": torch.full((3, i + 1), float(i)) for i in range(4)}
    save_file({k: state[k] for k in ("t0", "t1")}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in ("t2", "t3")}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {
            "t0": "model-00001-of-00002.safetensors",
            "t1": "model-00001-of-00002.safetensors",
            "t2": "model-00002-of-00002.safetensors",
            "t3": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for spec in (tmp_path, tmp_path / "model.safetensors.index.json"):
        r = ReleaseReader(str(spec))
        assert sorted(r.entries()) == sorted(state)
        for name, array in r.items():
            assert _same(array, state[name]), name


def _rewrite_zip(src: Path, dst: Path, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def test_broken_torch_files_name_the_file(tmp_path):
    torch.save({"a": torch.zeros(4), "b": torch.ones(3)}, tmp_path / "ok.pt")
    # Tensor data shorter than the pickle says.
    _rewrite_zip(
        tmp_path / "ok.pt", tmp_path / "short.pt", lambda name, data: data[:8] if name.endswith("data/0") else data
    )
    with pytest.raises(ValueError, match=r"short\.pt: tensor data data/0 holds 8 bytes"):
        ReleaseReader(str(tmp_path / "short.pt"))
    # Tensor data missing from the archive.
    _rewrite_zip(tmp_path / "ok.pt", tmp_path / "gone.pt", lambda name, data: None if name.endswith("data/1") else data)
    with pytest.raises(ValueError, match=r"gone\.pt: the pickle refers to tensor data data/1"):
        ReleaseReader(str(tmp_path / "gone.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ReleaseReader(str(tmp_path / "nope.pt"))
    r = ReleaseReader(str(tmp_path / "ok.pt"))
    with pytest.raises(KeyError, match=r"ok\.pt: no tensor 'c'"):
        r.get("c")


def test_both_backends_and_the_converters_use_the_one_reader():
    """No other module parses release files: the loaders import mugv.io.release."""
    for module in (
        "mugv_jax/dit/checkpoint.py",
        "mugv_jax/vae/checkpoint.py",
        "mugv_megatron/model/build.py",
        "converters/formats/__init__.py",
    ):
        text = (REPO / module).read_text()
        assert "mugv.io.release import" in text, module
        assert "safe_open" not in text and "torch.load(" not in text, module
