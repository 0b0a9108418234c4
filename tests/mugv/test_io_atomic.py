"""Outputs appear complete or not at all (mugv/io/atomic.py): the one write-temp-then-rename
helper every JSON, text, safetensors and checkpoint writer goes through."""

import json
import os

import pytest

from mugv.io.atomic import atomic_output, write_json, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "config.json")
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # not serialisable: fails half-way through the dump
    assert json.load(open(path)) == {"a": 1}
    assert os.listdir(tmp_path) == ["config.json"]
    write_json(path, {"a": 2}, indent=None)
    assert open(path).read() == '{"a": 2}'


def test_outputs_are_refused_or_replaced_whole(tmp_path):
    out = tmp_path / "out"
    with atomic_output(str(out)) as tmp:
        os.makedirs(tmp)
        write_text(os.path.join(tmp, "a"), "old")
    with pytest.raises(FileExistsError, match=f"output {out} already exists; pass --force"):
        with atomic_output(str(out)):
            pass
    with atomic_output(str(out), force=True) as tmp:  # a directory replaces a directory
        os.makedirs(tmp)
        write_text(os.path.join(tmp, "b"), "new")
        assert os.listdir(out) == ["a"]  # the old output stays until the new one is complete
    assert os.listdir(out) == ["b"] and os.listdir(tmp_path) == ["out"]
    with pytest.raises(FileNotFoundError, match="output directory .*/missing does not exist"):
        write_text(str(tmp_path / "missing" / "x"), "")
    with atomic_output(str(tmp_path / "made" / "x"), make_parent=True) as tmp:
        write_text(tmp, "x")
    assert open(tmp_path / "made" / "x").read() == "x"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umasks_mode(tmp_path, umask):
    """Issue 25: files written through safetensors (every latents, weights and features file)
    came out 0600 whatever the umask: unreadable for the other users of a shared directory."""
    import numpy as np
    from safetensors.numpy import save_file

    from mugv.io import latents
    from mugv.safetensors_io import save_atomic

    old = os.umask(umask)
    try:
        want = 0o666 & ~umask
        save_atomic({"a": np.zeros(2, np.float32)}, str(tmp_path / "w.safetensors"))
        latents.write(str(tmp_path / "z.safetensors"), np.zeros((1, 1, 1, 1)), {"fps": 8.0}, sidecar=True)
        write_json(str(tmp_path / "c.json"), {})
        with atomic_output(str(tmp_path / "dir")) as tmp:  # a directory output: every file in it
            os.makedirs(os.path.join(tmp, "sub"))
            save_file({"a": np.zeros(2, np.float32)}, os.path.join(tmp, "sub", "s.safetensors"))
        paths = ["w.safetensors", "z.safetensors", "z.json", "c.json", "dir/sub/s.safetensors"]
        assert {p: oct(os.stat(tmp_path / p).st_mode & 0o777) for p in paths} == {p: oct(want) for p in paths}
    finally:
        os.umask(old)


def test_a_rerun_removes_what_dead_writers_of_this_host_left_and_says_so(tmp_path, caplog):
    import logging
    import subprocess
    import sys

    from mugv.io import atomic

    host = atomic._host()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names a process that is gone
    stale = [f".out.pt.partial-{host}-{gone.pid}-0123abcd", f".out.pt.partial-{host}-{gone.pid}-0123abcd.staging"]
    kept = [
        f".out.pt.partial-{host}-{os.getppid()}-89abcdef",  # a live process is still writing it
        f".out.pt.partial-other-host-{gone.pid}-0123abcd",  # another machine's: not ours to judge
        ".out.pt.partial-12345-0123abcd",  # named before hosts were recorded
        f".other.pt.partial-{host}-{gone.pid}-0123abcd",  # another output's
    ]
    for n in stale + kept:
        os.makedirs(tmp_path / n)
    with caplog.at_level(logging.WARNING, logger="mugv.io"):
        write_text(str(tmp_path / "out.pt"), "x")
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["out.pt"])
    for n in stale:
        assert f"removed {tmp_path / n}: a partial output of process {gone.pid} on {host}, which is gone" in caplog.text
    assert "host is not recorded" in caplog.text and ".out.pt.partial-12345-0123abcd" in caplog.text
    # The temporary name records this host and process.
    assert os.path.basename(atomic.temp_name(str(tmp_path / "out.pt"))).startswith(
        f".out.pt.partial-{host}-{os.getpid()}-"
    )
