"""bench/te_offline.py on a small synthetic wheel: pack into carries under the limit, install
reassembles the exact wheel and installs it; a corrupt or missing part is refused by name."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from bench import te_offline
from tests.doc_commands import doc_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMIT = 64 * 1024


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(tmp_path, tamper=False):
    """fakete 1.0: a module and a 200 KiB incompressible 'library', with a RECORD."""
    files = {
        "fakete/__init__.py": b"import os\nVALUE = 42\nLIB = os.path.join(os.path.dirname(__file__), 'lib.bin')\n",
        "fakete/lib.bin": os.urandom(200 * 1024),
        "fakete-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fakete\nVersion: 1.0\n",
        "fakete-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    rows = [f"{n},{_record_hash(d)},{len(d)}" for n, d in files.items()]
    if tamper:
        files["fakete/__init__.py"] += b"# changed after RECORD\n"
    rows.append("fakete-1.0.dist-info/RECORD,,")
    files["fakete-1.0.dist-info/RECORD"] = ("\n".join(rows) + "\n").encode()
    path = tmp_path / ("bad" if tamper else "good") / "fakete-1.0-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for n, d in files.items():
            zf.writestr(n, d)
    return str(path)


@pytest.fixture
def packed(tmp_path):
    wheel = _wheel(tmp_path)
    extra = tmp_path / "notes.txt"
    extra.write_bytes(b"small file beside the wheel\n")
    out = str(tmp_path / "te")
    manifest = te_offline.pack([wheel, str(extra)], out, LIMIT)
    return wheel, out, manifest


def test_pack_then_install_gives_back_the_exact_wheel_installed(packed, tmp_path):
    wheel, out, manifest = packed
    for carry in manifest["carries"]:
        files = os.listdir(os.path.join(out, carry))
        assert files and sum(os.path.getsize(os.path.join(out, carry, f)) for f in files) <= LIMIT
    assert len(manifest["carries"]) == 4  # 200+ KiB of wheel and a small file in 64 KiB carries
    target = str(tmp_path / "site")
    code = te_offline.main(["install", "--parts", out, "--target", target])
    assert code == 0
    assembled = os.path.join(out, "assembled", os.path.basename(wheel))
    assert te_offline._sha256(assembled) == te_offline._sha256(wheel)
    probe = "import fakete, os; print(fakete.VALUE, os.path.getsize(fakete.LIB))"
    got = subprocess.run(
        [sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=target), capture_output=True, text=True
    )
    assert got.stdout.split() == ["42", str(200 * 1024)], got.stderr


def test_corrupt_or_missing_parts_are_refused_by_name(packed, tmp_path, capsys):
    _, out, manifest = packed
    parts = [p["path"] for p in manifest["files"][0]["parts"]]
    with open(os.path.join(out, parts[1]), "r+b") as fh:
        fh.write(b"\0")
    os.remove(os.path.join(out, parts[2]))
    code = te_offline.main(["install", "--parts", out, "--target", str(tmp_path / "site")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"missing parts ['{parts[2]}']" in err and f"corrupt parts ['{parts[1]}']" in err
    assert not (tmp_path / "site").exists()
    os.remove(os.path.join(out, te_offline.MANIFEST))
    with pytest.raises(te_offline.PartError, match="manifest.json is missing"):
        te_offline.verify_parts(out)


def test_a_wheel_differing_from_its_record_is_refused(tmp_path):
    assert te_offline.check_record(_wheel(tmp_path)) == 5
    with pytest.raises(te_offline.PartError, match="fakete/__init__.py differs from its RECORD"):
        te_offline.check_record(_wheel(tmp_path, tamper=True))


def test_pack_refuses_to_write_over_parts_and_sizes_carries_from_the_tree(packed, tmp_path):
    wheel, out, _ = packed
    with pytest.raises(FileExistsError, match="not empty"):
        te_offline.pack([wheel], out, LIMIT)
    with open(os.path.join(out, te_offline.MANIFEST)) as fh:
        assert json.load(fh)["carry_bytes"] == LIMIT
    # The default carry: what a 64 MiB call leaves beside this checkout's tree.
    room = te_offline.CALL_LIMIT - te_offline.tree_bytes(ROOT) - te_offline.MARGIN
    assert 0 < room < te_offline.CALL_LIMIT


def test_torch_extension_build_is_offline_pytorch_only_for_hopper(tmp_path):
    env = te_offline.torch_build_env("/tmp/site", jobs=16)
    assert env["NVTE_FRAMEWORK"] == "pytorch" and env["NVTE_PYTORCH_FORCE_BUILD"] == "TRUE"
    assert env["NVTE_CUDA_ARCHS"] == "90" and env["MAX_JOBS"] == "16"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == "/tmp/site"
    cmd = te_offline.torch_build_command("/src", "/wheels")
    assert cmd[1:4] == ["-m", "pip", "wheel"] and {"--no-index", "--no-build-isolation", "--no-deps"} <= set(cmd)


def test_the_documented_pack_and_install_commands(tmp_path):
    """docs/benchmarks.md's commands, on the synthetic wheel: pack a directory, install the carries."""
    src = tmp_path / "in"
    src.mkdir()
    wheel = _wheel(tmp_path)
    os.rename(wheel, src / os.path.basename(wheel))
    out, site = str(tmp_path / "te"), str(tmp_path / "site")
    pack = doc_command(
        "docs/benchmarks.md", "python bench/te_offline.py pack", {".whl/te": out, "/tmp/te-in": str(src)}
    )
    install = doc_command(
        "docs/benchmarks.md", "python bench/te_offline.py install", {".whl/te": out, "/tmp/site": site}
    )
    for argv in (pack, install):
        got = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True)
        assert got.returncode == 0, got.stderr
    assert os.path.isfile(os.path.join(site, "fakete", "lib.bin"))
    with open(os.path.join(out, te_offline.MANIFEST)) as fh:
        assert [f["name"] for f in json.load(fh)["files"]] == [os.path.basename(wheel)]


def test_the_extension_is_built_from_its_sdist_once(tmp_path, monkeypatch):
    sdist = tmp_path / "transformer_engine_torch-2.20.2.tar.gz"
    sdist.write_bytes(b"not unpacked in this test")
    out = str(tmp_path / "te")
    te_offline.pack([_wheel(tmp_path), str(sdist)], out, LIMIT)
    builds, installs = [], []
    monkeypatch.setattr(te_offline, "build_torch_extension", lambda s, t, w, j: builds.append(s) or "ext.whl")
    monkeypatch.setattr(te_offline, "pip_install", lambda wheels, target: installs.append(wheels))
    target = tmp_path / "site"
    target.mkdir()
    got = te_offline.install(out, str(target))
    assert [os.path.basename(b) for b in builds] == [sdist.name] and got["built"] == "ext.whl"
    assert [os.path.basename(w) for w in installs[0]] == ["fakete-1.0-py3-none-any.whl"] and installs[1] == ["ext.whl"]
    # An extension already built into the target on this machine is not built again.
    (target / "transformer_engine_torch.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    assert te_offline.install(out, str(target))["built"] is None and len(builds) == 1


def test_a_failed_extension_build_is_one_message_and_leaves_no_tree(tmp_path, monkeypatch, capsys):
    """The build runs where torch, setuptools and CUDA are (the GPU image); where it fails, install
    says so in one line naming the sdist and the command (exit 2), not a traceback."""
    import tarfile

    src = tmp_path / "transformer_engine_torch-2.20.2"
    src.mkdir()
    (src / "setup.py").write_text("raise SystemExit('no torch here')\n")
    sdist = tmp_path / "transformer_engine_torch-2.20.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(src, arcname=src.name)
    out = str(tmp_path / "te")
    te_offline.pack([_wheel(tmp_path), str(sdist)], out, LIMIT)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(te_offline.tempfile, "tempdir", None)
    monkeypatch.setattr(te_offline, "torch_build_command", lambda s, w: [sys.executable, os.path.join(s, "setup.py")])
    assert te_offline.main(["install", "--parts", out, "--target", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "building the torch extension from transformer_engine_torch-2.20.2.tar.gz failed" in err[0]
    assert os.listdir(tmp_path / "tmp") == []  # the unpacked sdist is gone
