#!/usr/bin/env bash
# Train on every worker of one Cloud TPU pod slice (v5p-256 = 128 chips, v6e-256 = 256 chips, ...).
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a [PROJECT=my-proj] \
#     launch/tpu_pod.sh configs/mugv_10b.py:video_720 gs://my-bucket/runs/720p --config.data.path=/data/prepared [...]
#
# Copies this checkout to ~/mugv on all workers and installs it into ~/mugv/.venv, made with a
# supported Python found there (python3.11, 3.12 or 3.13; MUGV_PYTHON names another), then starts
# the same command on all of them (SKIP_COPY=1 skips the copy once it is there and installed).
# Train flags are passed on as given, each one argument (a tuple override stays one). Output is
# appended to ~/mugv_train.log on each worker; the script exits with the training's status.
# jax.distributed finds the other workers from the TPU metadata (--distributed, no address needed).
# Workdir should be a gs:// path (orbax writes from every host). Re-running the same command resumes
# from the newest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: tpu_pod.sh CONFIG WORKDIR [train flags...]}
WORKDIR=${2:?usage: tpu_pod.sh CONFIG WORKDIR [train flags...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
GCLOUD=(gcloud compute tpus tpu-vm)
[[ -n "${PROJECT:-}" ]] && GCLOUD+=(--project="$PROJECT")
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/launch/tpu_common.sh"

if [[ -z "${SKIP_COPY:-}" ]]; then
  TARBALL=$(mktemp -t mugv_src.XXXXXX.tgz)
  trap 'rm -f "$TARBALL"' EXIT
  tpu_pack "$REPO" "$TARBALL"
  "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME":mugv_src.tgz --zone="$ZONE" --worker=all
  "${GCLOUD[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$(tpu_install_command)"
fi

"${GCLOUD[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$(tpu_train_command "$CONFIG" "$WORKDIR" "$@")"
