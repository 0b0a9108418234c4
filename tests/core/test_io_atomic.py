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
