"""Open a report in headless Chromium and read back its media check.

The report's inline script waits until every <video> has loaded its metadata (or failed), then
writes {"images": [...], "videos": [...]} into #media-check's data-result attribute; Chromium's
--dump-dom prints the DOM after the virtual-time budget, and we parse that attribute.

    python -m main_job.browser outputs/main/report.html
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
    "--mute-audio",
)


def chromium_binary() -> str:
    for b in (os.environ.get("MUGV_CHROMIUM"), "chromium", "chromium-browser"):
        if b and shutil.which(b):
            return shutil.which(b)
    raise FileNotFoundError(
        "Chromium not found: install Debian's 'chromium' (scripts/ensure_chromium.sh) or set MUGV_CHROMIUM to its path"
    )


def check_report(path: str, *, budget_ms: int = 60000, timeout_s: float = 120.0) -> dict:
    """{"images": [{src, ok, width}], "videos": [{src, ok, readyState, duration, error}]} as the
    browser saw them. Raises if the page never wrote its result."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no report at {path}")
    with tempfile.TemporaryDirectory(prefix="mugv-chromium-") as profile:
        cmd = [
            chromium_binary(),
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            "file://" + path,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    m = re.search(r'id="media-check"[^>]*data-result="([^"]*)"', proc.stdout) or re.search(
        r'data-result="([^"]*)"[^>]*id="media-check"', proc.stdout
    )
    if m is None:
        raise RuntimeError(
            f"{path}: the page's media check never finished in Chromium "
            f"(exit {proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}"
        )
    return json.loads(html.unescape(m.group(1)))


def broken(result: dict) -> list[str]:
    return [f"{kind[:-1]} {m['src']}: {m}" for kind in ("images", "videos") for m in result[kind] if not m["ok"]]


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m main_job.browser REPORT.html", file=sys.stderr)
        return 2
    result = check_report(args[0])
    bad = broken(result)
    print(f"{len(result['images'])} images, {len(result['videos'])} videos, {len(bad)} broken")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
