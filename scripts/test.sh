#!/usr/bin/env bash
# The test command: set up the environment if needed, then run the whole suite. The suite is
# dominated by single-threaded XLA compiles, so it runs in two worker processes (one per core of
# the CI machine); MUGV_TEST_WORKERS=0 runs it in one process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/ensure_venv.sh")"
export MUGV_CHROMIUM="$(bash "$root/scripts/ensure_chromium.sh")"
cd "$root"
workers="${MUGV_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  exec "$py" -m pytest tests -q -p no:cacheprovider "$@"
fi
exec "$py" -m pytest tests -q -p no:cacheprovider -n "$workers" --dist=loadfile "$@"
