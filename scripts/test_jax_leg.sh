#!/usr/bin/env bash
# The JAX-only test leg: Python 3.12 with the newest jax/flax (constraints/ci-py312-jax.txt) and no
# torch, running the JAX model, sampler, trainer, planner and TPU-export tests (one or a few of each
# kind: the full suite runs them all on Python 3.11; this leg proves the newest jax runs them). scripts/test.sh runs
# it after the full suite. The venv is .venv-py312 (override: MUGV_VENV_PY312); the interpreter is
# $PYTHON312, else pyenv's newest 3.12, else a python3.12 on PATH that runs. Without one the leg is reported as not run
# (exit 0), unless MUGV_JAX_LEG=required (CI), where a missing interpreter is an error.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py312="${PYTHON312:-}"
if [ -z "$py312" ]; then
  # pyenv's version directories first: its python3.12 shim is on PATH but fails unless 3.12 is an
  # active pyenv version (as on CI), so a name on PATH only counts once it runs.
  py312="$(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -z "$py312" ] && python3.12 -c pass >/dev/null 2>&1; then py312=python3.12; fi
fi
if [ -n "$py312" ] && ! "$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
  echo "[mugv] the JAX leg's interpreter $py312 does not run as Python 3.12" >&2; exit 1
fi
if [ -z "$py312" ]; then
  if [ "${MUGV_JAX_LEG:-}" = "required" ]; then
    echo "[mugv] the JAX leg needs Python 3.12 (set PYTHON312): none found" >&2; exit 1
  fi
  echo "[mugv] JAX leg NOT RUN: no Python 3.12 found (set PYTHON312=/path/to/python3.12 to run it)" >&2
  exit 0
fi
py="$(PYTHON="$py312" MUGV_VENV="${MUGV_VENV_PY312:-$root/.venv-py312}" \
  MUGV_CONSTRAINTS="$root/constraints/ci-py312-jax.txt" MUGV_EXTRAS=test bash "$root/scripts/ensure_venv.sh")"
cd "$root"
"$py" -c 'import importlib.util as u, jax, sys; assert u.find_spec("torch") is None, "the JAX leg must not have torch"; print(f"[mugv] JAX leg: Python {sys.version.split()[0]}, jax {jax.__version__}", file=sys.stderr)'
exec "$py" -m pytest -q -p no:cacheprovider -n "${MUGV_TEST_WORKERS:-2}" --dist=loadfile \
  tests/project/test_lint.py \
  'tests/mugv_jax/test_dit_golden.py::test_golden_output_and_every_activation[t2v]' \
  tests/mugv_jax/test_dit_golden.py::test_rope_positions_of_special_tokens_matter \
  tests/mugv_jax/test_dit_golden.py::test_bad_inputs_name_the_argument \
  tests/mugv_jax/test_sampler.py::test_golden_i2v_sampling_with_guidance \
  tests/mugv_jax/test_trainer.py::test_one_step_updates_params_ema_and_counters \
  tests/mugv_jax/test_plan.py::test_planner_memory_matches_a_real_step \
  tests/mugv_jax/test_export.py::test_shipped_10b_layout_lowers_for_tpu_at_its_real_device_count \
  "$@"
