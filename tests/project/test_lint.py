"""The tree is formatted and linted with the ruff configuration in pyproject.toml."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "pyproject.toml")


def _ruff(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True)


def test_ruff_lint_passes_on_the_tree():
    r = _ruff("check", "--no-cache", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_leaves_the_tree_unchanged():
    r = _ruff("format", "--no-cache", "--check", ".")
    assert r.returncode == 0, "run `ruff format .`:\n" + r.stdout + r.stderr


def test_the_configuration_refuses_an_unused_import_and_unformatted_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")
    r = _ruff("check", "--no-cache", "--config", CONFIG, str(bad), cwd=tmp_path)
    assert r.returncode == 1 and "F401" in r.stdout
    r = _ruff("format", "--no-cache", "--check", "--config", CONFIG, str(bad), cwd=tmp_path)
    assert r.returncode == 1
