#!/usr/bin/env bash
# Create (once) and reuse the project's virtual environment at .venv (override: MUGV_VENV) with the
# exact set CI tests (constraints/ci-py311.txt on Python 3.11; MUGV_CONSTRAINTS names another lock
# file, MUGV_EXTRAS other extras). Re-installs only when pyproject.toml or the lock file changes.
# Prints the venv's python path on stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MUGV_VENV:-$root/.venv}"
constraints="${MUGV_CONSTRAINTS:-$root/constraints/ci-py311.txt}"
extras="${MUGV_EXTRAS:-all,dev}"
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 13), f"mugv supports Python 3.11-3.13, found {sys.version}"' >&2
  echo "[mugv] creating virtual environment $venv ($("$python_bin" --version 2>&1))" >&2
  "$python_bin" -m venv "$venv" >&2
fi
stamp="$venv/.mugv-install-stamp"
want="$(cat "$root/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[mugv] installing mugv[$extras] into $venv from $(basename "$constraints") (about 90 s on a fresh machine)" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$constraints" -e "$root[$extras]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
