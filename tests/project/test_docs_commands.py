"""Docs as tests: every shell command in README.md, docs/*.md and the launch scripts' headers is
run by a test through `doc_command` or marked `# illustrative: <why>` in the doc (issue 25)."""

from __future__ import annotations

import pytest

from tests.doc_commands import all_commands, ambiguous_calls, doc_block, doc_command, find, split_env, uncovered


def test_every_documented_command_is_run_or_marked_illustrative():
    missing = uncovered()
    assert not missing, (
        "documented commands no test runs: take them with doc_command(FILE, PREFIX) in a test, or put a\n"
        "'# illustrative: <why>' line before them in the block (launch scripts: in the header):\n  "
        + "\n  ".join(f"{c.where()}: {c.text}" for c in missing)
    )


def test_every_doc_command_call_names_one_command():
    # Checked statically, so a doc edited on another branch shows here, not minutes into a run.
    # (This file's own calls name the temporary docs below.)
    bad = ambiguous_calls(skip=("tests/project/test_docs_commands.py",))
    assert not bad, "doc_command prefixes that name no or several commands:\n  " + "\n  ".join(bad)


def _tree(tmp_path, block: str, test: str = ""):
    (tmp_path / "docs").mkdir(exist_ok=True)
    (tmp_path / "launch").mkdir(exist_ok=True)
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "README.md").write_text("# x\n\n```bash\necho selftest --b=1   # covered\n```\n")
    (tmp_path / "docs" / "new.md").write_text("Intro.\n\n```\n" + block + "```\n\n```python\nimport os\n```\n")
    (tmp_path / "launch" / "run.sh").write_text(
        "#!/usr/bin/env bash\n# Runs.\n#\n#   X=1 launch/run.sh A \\\n#     B\nset -e\n"
    )
    calls = 'doc_command("README.md", "echo selftest")\ndoc_command("launch/run.sh", "X=1 launch/run.sh A B")\n'
    (tmp_path / "tests" / "test_x.py").write_text(calls + test)


def test_the_checker_fails_on_an_added_command_until_it_is_covered_or_marked(tmp_path):
    # A console block: `$ ` lines are commands, the others output; the python block is not shell.
    _tree(tmp_path, "$ python -m selftest_new \\\n    --flag=2\noutput line\n")
    assert [(c.where(), c.text) for c in uncovered(tmp_path)] == [("docs/new.md:4", "python -m selftest_new --flag=2")]
    _tree(tmp_path, "# illustrative: needs a TPU pod\n$ python -m selftest_new \\\n    --flag=2\n")
    assert uncovered(tmp_path) == []
    _tree(tmp_path, "python -m selftest_new --flag=2\n", test='doc_command("docs/new.md", "python -m selftest_new")\n')
    assert uncovered(tmp_path) == []
    # A call naming another file does not cover this one.
    _tree(tmp_path, "python -m selftest_new --flag=2\n", test='doc_command("README.md", "python -m selftest_new")\n')
    assert [c.where() for c in uncovered(tmp_path)] == ["docs/new.md:4"]
    assert ambiguous_calls(tmp_path) == ["tests/test_x.py: README.md 'python -m selftest_new' (0 commands)"]


def test_a_named_block_is_covered_whole_by_doc_block(tmp_path):
    _tree(tmp_path, "python -m selftest_new --flag=2\n")
    doc = tmp_path / "docs" / "new.md"
    doc.write_text(
        doc.read_text() + "\n<!-- commands: pair -->\n```sh\n# two\npython -m one /ckpt/x\npython -m two /ckpt\n```\n"
    )
    assert [c.where() for c in uncovered(tmp_path)] == ["docs/new.md:4", "docs/new.md:14", "docs/new.md:15"]
    (tmp_path / "tests" / "test_y.py").write_text('doc_block("docs/new.md", "pair")\n')
    assert [c.where() for c in uncovered(tmp_path)] == ["docs/new.md:4"]
    # Substitutions at once, longest first: /ckpt/x is not cut by /ckpt, nor a result substituted again.
    got = doc_block("docs/new.md", "pair", {"/ckpt": "/t/ckpt/x", "/ckpt/x": "/u"}, root=tmp_path)
    assert got == [["python", "-m", "one", "/u"], ["python", "-m", "two", "/t/ckpt/x"]]
    with pytest.raises(LookupError, match="no shell block after '<!-- commands: other -->'"):
        doc_block("docs/new.md", "other", root=tmp_path)


def test_doc_command_substitutes_what_the_doc_says_and_refuses_what_it_does_not(tmp_path):
    _tree(
        tmp_path,
        "CONFIG=configs/mugv_10b.py:video_720 python -m selftest_new --out=/ckpt/x \\\n"
        '  [--more=1 ...] --c=x.py[:final] [--neg[="..."]]   # a comment\n',
    )
    argv = doc_command("docs/new.md", "CONFIG=", {"10b.py": "tiny.py", "/ckpt": str(tmp_path)}, root=tmp_path)
    env, argv = split_env(argv)
    assert env == {"CONFIG": "configs/mugv_tiny.py:video_720"}
    assert argv == [
        "python",
        "-m",
        "selftest_new",
        f"--out={tmp_path}/x",
        "--c=x.py[:final]",
    ]  # optional words left out
    with pytest.raises(LookupError, match="no '/data'"):
        doc_command("docs/new.md", "CONFIG=", {"/data": "x"}, root=tmp_path)
    with pytest.raises(LookupError, match="found:\n  none"):
        find("docs/new.md", "python -m other", root=tmp_path)
    assert doc_command("launch/run.sh", "X=1", root=tmp_path) == ["X=1", "launch/run.sh", "A", "B"]


def test_commands_come_from_shell_blocks_and_headers_only():
    by_file: dict[str, list[str]] = {}
    for c in all_commands():
        by_file.setdefault(c.file, []).append(c.text)
    assert {"README.md", "launch/tpu_pod.sh", "launch/megatron_slurm.sbatch"} <= set(by_file)
    # (The self-test above shows a console block's output lines and python blocks left out.)
    assert not [t for texts in by_file.values() for t in texts if t.startswith(("import ", "{", "#", "$"))]
