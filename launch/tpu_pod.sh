#!/usr/bin/env bash
# Train on every worker of one Cloud TPU pod slice (v5p-256 = 128 chips, v6e-256 = 256 chips, ...).
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a [PROJECT=my-proj] \
#     launch/tpu_pod.sh configs/mugv_10b.py:video_720 gs://my-bucket/runs/720p --config.data.path=/data/prepared [...]
#
# Copies this checkout to ~/mugv on all workers (set SKIP_COPY=1 once it is there and installed),
# then starts the same command on all of them. jax.distributed finds the other workers from the
# TPU metadata (--distributed, no address needed). Workdir should be a gs:// path (orbax writes
# from every host). Re-running the same command resumes from the newest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: tpu_pod.sh CONFIG WORKDIR [train flags...]}
WORKDIR=${2:?usage: tpu_pod.sh CONFIG WORKDIR [train flags...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
GCLOUD=(gcloud compute tpus tpu-vm)
[[ -n "${PROJECT:-}" ]] && GCLOUD+=(--project="$PROJECT")
REPO=$(cd "$(dirname "$0")/.." && pwd)

# XLA/libtpu flags: overlap FSDP all-gathers and reduce-scatters with compute (async collective
# fusion), and let the latency-hiding scheduler move collectives early. Documented in docs/scaling.md.
LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:---xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true \
--xla_enable_async_reduce_scatter=true \
--xla_tpu_enable_latency_hiding_scheduler=true}"

if [[ -z "${SKIP_COPY:-}" ]]; then
  tar -C "$REPO" --exclude=.venv --exclude=.git -czf /tmp/mugv_src.tgz .
  "${GCLOUD[@]}" scp /tmp/mugv_src.tgz "$TPU_NAME":/tmp/mugv_src.tgz --zone="$ZONE" --worker=all
  "${GCLOUD[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="mkdir -p ~/mugv && \
    tar -C ~/mugv -xzf /tmp/mugv_src.tgz && cd ~/mugv && pip install -q -e . 'jax[tpu]'"
fi

"${GCLOUD[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="cd ~/mugv && \
  LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS' python -m mugv_jax.train --config=$CONFIG --workdir=$WORKDIR \
  --distributed $* 2>&1 | tee -a /tmp/mugv_train.log"
