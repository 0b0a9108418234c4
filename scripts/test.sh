#!/usr/bin/env bash
# The test command: set up the environment if needed, run the whole suite (Python 3.11, the exact
# set of constraints/ci-py311.txt), then the JAX-only leg on Python 3.12 with the newest jax
# (scripts/test_jax_leg.sh; MUGV_JAX_LEG=skip leaves it out). The suite is dominated by
# single-threaded XLA compiles, so it runs in two worker processes (one per core of the CI
# machine); MUGV_TEST_WORKERS=0 runs it in one process. Arguments go to the full suite's pytest
# (then the leg is left out: a selection is being run). The 30 slowest tests are listed at the end,
# to keep the suite inside its 25-minute budget; files start longest first (tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/ensure_venv.sh")"
export MUGV_CHROMIUM="$(bash "$root/scripts/ensure_chromium.sh")"
cd "$root"
workers="${MUGV_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  "$py" -m pytest tests -q -p no:cacheprovider --durations=30 "$@"
else
  "$py" -m pytest tests -q -p no:cacheprovider --durations=30 -n "$workers" --dist=loadfile --no-loadscope-reorder "$@"
fi
if [ "$#" -eq 0 ] && [ "${MUGV_JAX_LEG:-}" != "skip" ]; then
  bash "$root/scripts/test_jax_leg.sh"
fi
