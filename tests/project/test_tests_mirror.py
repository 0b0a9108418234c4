"""Test files mirror the source (Megatron-Core's habit): tests/<package>/ holds the tests of that
package, so a reader finds a module's tests without a search; tests/cross_backend/ holds the tests
that run more than one backend together, tests/project/ those of the repository as a whole (lint,
packaging, the import graph, docs, launch scripts, configs)."""

import ast
import os

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mugv", "mugv_jax", "mugv_megatron", "mugv_data", "converters", "main_job", "bench")
MIXED = ("cross_backend", "project")


def _rooms() -> dict[str, list[str]]:
    rooms = {}
    for d in sorted(os.listdir(TESTS)):
        path = os.path.join(TESTS, d)
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.startswith("test_") and f.endswith(".py"))
            if files:
                rooms[d] = files
    return rooms


def _uses(source: str, package: str) -> bool:
    """The file imports `package` or runs it (`-m package…`, `package/…` paths)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == package for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == package:
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if v == package or v.startswith((f"{package}.", f"{package}/")) or f"-m {package}" in v:
                return True
    return False


def test_every_test_directory_is_a_package_or_a_mixed_room():
    assert set(_rooms()) <= set(PACKAGES) | set(MIXED), sorted(set(_rooms()) - set(PACKAGES) - set(MIXED))


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_room_tests_its_package(package):
    files = _rooms().get(package, [])
    assert files, f"tests/{package}/ has no tests"
    strays = [f for f in files if not _uses(open(os.path.join(TESTS, package, f)).read(), package)]
    assert not strays, f"tests/{package}/ holds tests that neither import nor run {package}: {strays}"


def test_the_check_catches_a_stray():
    assert _uses("from mugv_jax.train import backend\n", "mugv_jax")
    assert _uses("cmd = ['python', '-m', 'converters', 'convert']\nx = '-m converters'\n", "converters")
    assert not _uses("import mugv_jax\n", "mugv")
    assert not _uses("from tests.helpers import x\n", "mugv_jax")
