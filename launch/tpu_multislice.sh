#!/usr/bin/env bash
# Train on several TPU slices joined over the data-centre network (multi-slice, DCN).
#
#   QR_NAME=my-qr ZONE=us-east5-a NUM_SLICES=2 [PROJECT=my-proj] \
#     launch/tpu_multislice.sh configs/mugv_10b.py:video_720:v5p-256x2 gs://my-bucket/runs/720p \
#       --config.data.path=/data/prepared [train flags...]
#
# A configs/mugv_10b.py stage must name the slices (<pod>x$NUM_SLICES): that layout keeps the
# stage's global batch over NUM_SLICES × the slice's data parallelism (less accumulation); the
# script refuses it otherwise. Other configs get mesh.dcn.data=$NUM_SLICES as they are.
#
# The slices come from one queued resource created with --node-count=$NUM_SLICES (for example
#   gcloud compute tpus queued-resources create $QR_NAME --zone=$ZONE --accelerator-type=v5p-256 \
#     --runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=$QR_NAME).
# libtpu sets up the MEGASCALE_* environment on each worker, JAX sees all slices' devices and
# `slice_index` on each; the mesh puts the data axis over slices (mesh.dcn.data = NUM_SLICES) so only
# the gradient all-reduce crosses DCN, while FSDP/tensor/context stay inside a slice (ICI).
# Copying, the venv of a supported Python and argument handling are tpu_pod.sh's (launch/tpu_common.sh).
# The script waits for every slice and exits non-zero, naming them, if any slice's training failed.
set -euo pipefail
CONFIG=${1:?usage: tpu_multislice.sh CONFIG WORKDIR [train flags...]}
WORKDIR=${2:?usage: tpu_multislice.sh CONFIG WORKDIR [train flags...]}
shift 2
: "${QR_NAME:?set QR_NAME}" "${ZONE:?set ZONE}" "${NUM_SLICES:?set NUM_SLICES}"
if [[ "$CONFIG" == *mugv_10b.py:* && "${CONFIG%%@*}" != *x"$NUM_SLICES" ]]; then
  echo "tpu_multislice.sh: $CONFIG is laid out for one slice; name the $NUM_SLICES slices in the pod," \
    "e.g. configs/mugv_10b.py:video_720:v5p-256x$NUM_SLICES (keeps the stage's global batch)" >&2
  exit 2
fi
GCLOUD=(gcloud compute tpus tpu-vm)
[[ -n "${PROJECT:-}" ]] && GCLOUD+=(--project="$PROJECT")
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/launch/tpu_common.sh"

if [[ -z "${SKIP_COPY:-}" ]]; then
  TARBALL=$(mktemp -t mugv_src.XXXXXX.tgz)
  trap 'rm -f "$TARBALL"' EXIT
  tpu_pack "$REPO" "$TARBALL"
  for ((s = 0; s < NUM_SLICES; s++)); do
    "${GCLOUD[@]}" scp "$TARBALL" "${QR_NAME}-${s}":mugv_src.tgz --zone="$ZONE" --worker=all
    "${GCLOUD[@]}" ssh "${QR_NAME}-${s}" --zone="$ZONE" --worker=all --command="$(tpu_install_command)"
  done
fi

TRAIN=$(tpu_train_command "$CONFIG" "$WORKDIR" --config.mesh.dcn.data="$NUM_SLICES" "$@")
pids=()
for ((s = 0; s < NUM_SLICES; s++)); do
  "${GCLOUD[@]}" ssh "${QR_NAME}-${s}" --zone="$ZONE" --worker=all --command="$TRAIN" &
  pids+=($!)
done
failed=()
for s in "${!pids[@]}"; do
  wait "${pids[$s]}" || failed+=("${QR_NAME}-${s} (exit $?)")
done
if ((${#failed[@]})); then
  echo "tpu_multislice.sh: training failed on ${failed[*]}; see ~/mugv_train.log on its workers" >&2
  exit 1
fi
