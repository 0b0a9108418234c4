"""The suite's file order (tests/conftest.py FILE_SECONDS): longest files first, and no stale names."""

import os
import types

from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_timed_file_exists():
    missing = [name for name in conftest.FILE_SECONDS if not os.path.isfile(os.path.join(ROOT, name))]
    assert not missing, f"tests/conftest.py FILE_SECONDS names files that are gone: {missing}"


def test_longest_files_come_first_and_files_stay_whole():
    longest, second = sorted(conftest.FILE_SECONDS, key=conftest.FILE_SECONDS.get, reverse=True)[:2]
    ids = ["tests/x/test_untimed.py::a", f"{second}::a", f"{longest}::a", f"{second}::b", f"{longest}::b"]
    items = [types.SimpleNamespace(nodeid=i) for i in ids]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == [
        f"{longest}::a",
        f"{longest}::b",
        f"{second}::a",
        f"{second}::b",
        "tests/x/test_untimed.py::a",
    ]


def test_the_test_command_keeps_that_order():
    text = open(os.path.join(ROOT, "scripts", "test.sh")).read()
    assert "--dist=loadfile --no-loadscope-reorder" in text
