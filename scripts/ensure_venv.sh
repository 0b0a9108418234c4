#!/usr/bin/env bash
# Create (once) and reuse the project's virtual environment at .venv (override: MUGV_VENV).
# Re-installs only when pyproject.toml changes. Prints the venv's python path on stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MUGV_VENV:-$root/.venv}"
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"mugv needs Python 3.11, found {sys.version}"' >&2
  echo "[mugv] creating virtual environment $venv" >&2
  "$python_bin" -m venv "$venv" >&2
fi
stamp="$venv/.mugv-install-stamp"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[mugv] installing dependencies into $venv (about 90 s on a fresh machine)" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -e "$root[dev]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
