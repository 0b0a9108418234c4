"""Seconds per test file from a JUnit XML report, as tests/conftest.py's FILE_SECONDS table.

    bash scripts/test.sh --junitxml=/tmp/suite.xml
    python scripts/file_seconds.py /tmp/suite.xml

Prints the files above one minute (largest first); paste them over the table.
"""

import collections
import sys
import xml.etree.ElementTree as ET


def file_seconds(path: str, least: float = 60.0) -> dict[str, int]:
    per = collections.Counter()
    for case in ET.parse(path).iter("testcase"):
        name = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        per[name] += float(case.get("time") or 0.0)
    return {name: round(s) for name, s in per.most_common() if s >= least}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/file_seconds.py REPORT.xml")
    print("FILE_SECONDS = {")
    for name, s in file_seconds(sys.argv[1]).items():
        print(f'    "{name}": {s},')
    print("}")
