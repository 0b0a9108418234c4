#!/usr/bin/env bash
# The test command: set up the environment if needed, then run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/ensure_venv.sh")"
cd "$root"
exec "$py" -m pytest tests -q -p no:cacheprovider "$@"
