"""Checksums on everything we write, checked on read (issue 26): a changed byte in any file of
any output kind is reported by `python -m converters verify PATH` (exit 1, naming the file) or
refused by its reader (exit 2), never read back as if it were the weights written."""

import os
import shutil

import pytest

from converters import cli
from converters.convert import convert
from tests.helpers import DIT_WEIGHTS

OUTPUTS = {
    "safetensors": "release:{d}/w.safetensors",
    "pt": "release:{d}/w.pt",
    "shards": "release:{d}/shards/model.safetensors.index.json",
    "torch_dist": "megatron:{d}/td",
    "legacy": "megatron-legacy:{d}/legacy",
    "jax": "jax:{d}/jax",
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("checksummed")
    out = {}
    for kind, spec in OUTPUTS.items():
        spec = spec.format(d=d)
        extra = {"tp": 2} if kind == "legacy" else {"max_shard_bytes": 400_000} if kind == "shards" else {}
        convert(f"release:{DIT_WEIGHTS}", spec, workers=1, **extra)
        out[kind] = spec
    return d, out


def _flip(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("kind", list(OUTPUTS))
def test_a_changed_byte_in_any_file_is_reported(outputs, kind, tmp_path, capsys):
    root, specs = outputs
    fmt, path = specs[kind].split(":", 1)
    assert cli.main(["verify", f"{fmt}:{path}"]) == 0
    assert "checksums match" in capsys.readouterr().out
    top = path if os.path.isdir(path) else os.path.dirname(path)
    files = [os.path.relpath(os.path.join(dp, n), top) for dp, _, ns in os.walk(top) for n in ns]
    if not os.path.isdir(path):
        files = [os.path.basename(path)]
    assert files
    for rel in sorted(files):
        copy = tmp_path / rel.replace(os.sep, "_")
        shutil.copytree(top, copy)
        _flip(copy / rel)
        target = os.path.join(copy, os.path.relpath(path, top)) if os.path.isdir(path) else str(copy / rel)
        code = cli.main(["verify", f"{fmt}:{target}"])
        out, err = capsys.readouterr()
        assert code in (1, 2), (kind, rel, out, err)
        if code == 1:
            assert "CORRUPT" in out and os.path.basename(rel) in out, (kind, rel, out)
        else:
            assert err.startswith("error: "), (kind, rel, err)
        shutil.rmtree(copy)


def test_release_reads_refuse_a_changed_tensor(outputs, tmp_path):
    from mugv.io.digest import CorruptCheckpoint
    from mugv.io.release import ReleaseReader

    _, specs = outputs
    for kind in ("safetensors", "pt"):
        src = specs[kind].split(":", 1)[1]
        copy = str(tmp_path / os.path.basename(src))
        shutil.copy(src, copy)
        entries = ReleaseReader(copy).entries()
        # The biggest tensor's middle byte: what a sampler or init_from would have read silently.
        name = max(entries, key=lambda n: entries[n].nbytes)
        data = ReleaseReader(copy).get(name).tobytes()
        offset = open(copy, "rb").read().find(data) + len(data) // 2
        with open(copy, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x01]))
        with pytest.raises(CorruptCheckpoint, match=f"tensor {name}"):
            ReleaseReader(copy).get(name)
