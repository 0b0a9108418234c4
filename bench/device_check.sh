#!/usr/bin/env bash
# One device check for the fused attention paths (bench/device_check.py has the details).
#
#   bash bench/device_check.sh              # GPU machine: at most 8 min (--budget) on one H100/H200
#   bash bench/device_check.sh --dry-run    # any CPU machine, about a minute
#
# The GPU machine may have no network and no project install: wheels in .whl/ (megatron-core
# and what it needs that the machine lacks) are installed into /tmp/site without touching the
# system packages, and the repository root goes on PYTHONPATH. Parts whose packages are still
# missing (Transformer Engine) are skipped with the reason printed. Results: $OUT (or --out DIR):
# the log holds a per-op profile table of every step part.
set -euo pipefail
# device_check.py's --budget counts from here, the installs below included.
export DEVICE_CHECK_STARTED=${DEVICE_CHECK_STARTED:-$(date +%s)}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The dry run needs no wheels (and the carried ones are for the device's python).
if compgen -G ".whl/*.whl" > /dev/null && [[ " $* " != *" --dry-run "* ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Transformer Engine, carried in parts (bench/te_offline.py): verified, reassembled, installed into
# /tmp/site and its torch extension built there, once every carry is in; without them the TE
# rows are skipped with the reason.
if [[ -f .whl/te/manifest.json && " $* " != *" --dry-run "* ]]; then
  "$PYTHON" bench/te_offline.py install --parts .whl/te --target /tmp/site ${OUT:+--build-wheel-to "$OUT"} \
    || echo "device_check.sh: Transformer Engine not installed (the reason is above)" >&2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PYTHON" -u bench/device_check.py "$@"
