# Shared by launch/tpu_pod.sh and launch/tpu_multislice.sh (sourced, not run): copying the checkout
# to a TPU VM's workers, installing it into a virtual environment of a supported Python there, and
# the training command every worker runs.

# XLA/libtpu flags: overlap FSDP all-gathers and reduce-scatters with compute (async collective
# fusion), and let the latency-hiding scheduler move collectives early. Documented in docs/scaling.md.
LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:---xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true \
--xla_enable_async_reduce_scatter=true \
--xla_tpu_enable_latency_hiding_scheduler=true}"

# Pythons the project supports (pyproject.toml, requires-python), tried in this order on each
# worker; MUGV_PYTHON (a name or path on the workers) goes first. The TPU VM's system python is
# not one of them on current images.
TPU_PYTHONS="${MUGV_PYTHON:-} python3.11 python3.12 python3.13"

# The checkout as a tarball (no virtual environments, git data or run outputs).
tpu_pack() {
  local repo=$1 tarball=$2
  # .venv* also leaves out the test suite's Python 3.12 environment (.venv-py312, ~1 GB).
  tar -C "$repo" --exclude='./.venv*' --exclude=./.git --exclude=./outputs --exclude=./runs --exclude=./build \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache -czf "$tarball" .
}

# The command that unpacks ~/mugv_src.tgz into ~/mugv and installs it, with JAX for TPU, into
# ~/mugv/.venv made from the first supported Python found (an existing venv is reused).
tpu_install_command() {
  cat <<EOF
set -euo pipefail
py=""
for c in $TPU_PYTHONS; do if command -v "\$c" >/dev/null 2>&1; then py=\$c; break; fi; done
if [[ -z "\$py" ]]; then
  echo "\$(hostname): no supported Python (tried $TPU_PYTHONS): install one with venv support" \
    "(e.g. sudo apt-get install -y python3.11 python3.11-venv) or set MUGV_PYTHON" >&2
  exit 1
fi
mkdir -p ~/mugv && tar -C ~/mugv -xzf ~/mugv_src.tgz
[[ -x ~/mugv/.venv/bin/python ]] || "\$py" -m venv ~/mugv/.venv
~/mugv/.venv/bin/python -m pip install -q -e ~/mugv'[tpu]'
EOF
}

# The training command: every argument quoted for the remote shell (printf %q), so tuples and
# spaces in overrides arrive as the one argument they were here; pipefail so that the exit status
# is python's, not tee's.
tpu_train_command() {
  local config=$1 workdir=$2
  shift 2
  local args
  args=$(printf ' %q' --config="$config" --workdir="$workdir" --distributed "$@")
  printf 'set -o pipefail; cd ~/mugv && LIBTPU_INIT_ARGS=%q ~/mugv/.venv/bin/python -m mugv_jax.train%s 2>&1 | tee -a ~/mugv_train.log' \
    "$LIBTPU_INIT_ARGS" "$args"
}
