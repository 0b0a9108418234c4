#!/usr/bin/env bash
# Train on several TPU slices joined over the data-centre network (multi-slice, DCN).
#
#   QR_NAME=my-qr ZONE=us-east5-a NUM_SLICES=2 [PROJECT=my-proj] \
#     launch/tpu_multislice.sh configs/mugv_10b.py:video_720:v5p-256x2 gs://my-bucket/runs/720p [train flags...]
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
LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:---xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true \
--xla_enable_async_reduce_scatter=true \
--xla_tpu_enable_latency_hiding_scheduler=true}"

tar -C "$REPO" --exclude=.venv --exclude=.git -czf /tmp/mugv_src.tgz .
for ((s = 0; s < NUM_SLICES; s++)); do
  node="${QR_NAME}-${s}"
  if [[ -z "${SKIP_COPY:-}" ]]; then
    "${GCLOUD[@]}" scp /tmp/mugv_src.tgz "$node":/tmp/mugv_src.tgz --zone="$ZONE" --worker=all
    "${GCLOUD[@]}" ssh "$node" --zone="$ZONE" --worker=all --command="mkdir -p ~/mugv && \
      tar -C ~/mugv -xzf /tmp/mugv_src.tgz && cd ~/mugv && pip install -q -e . 'jax[tpu]'"
  fi
  "${GCLOUD[@]}" ssh "$node" --zone="$ZONE" --worker=all --command="cd ~/mugv && \
    LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS' python -m mugv_jax.train --config=$CONFIG --workdir=$WORKDIR \
    --distributed --config.mesh.dcn.data=$NUM_SLICES $* 2>&1 | tee -a /tmp/mugv_train.log" &
done
wait
