#!/usr/bin/env bash
# Megatron-Core MUG-DiT training on one node (or one node of a manual multi-node run) with torchrun.
#
#   CONFIG=configs/mugv_10b.py:video_720:h100x128 WORKDIR=/ckpt/run1 \
#       bash launch/megatron_torchrun.sh --config.init_from=/models/dit.pt --config.data.path=/data/prepared
#
# Variables (defaults in brackets): CONFIG [configs/tiny.py], WORKDIR [runs/megatron],
# GPUS_PER_NODE [all visible GPUs], NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1],
# MASTER_PORT [29500]; TP_SIZE, SP [0 = off, 1 = sequence parallel], PP_SIZE, CP_SIZE override the
# config's config.megatron layout (the H100 pods of configs/mugv_10b.py carry a planned one:
# python -m mugv_megatron.plan) only when set. Data parallel = world size / (TP * CP * PP).
# Extra arguments go to mugv_megatron.train (docs/megatron_training.md).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/tiny.py}
WORKDIR=${WORKDIR:-runs/megatron}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

# Recommended environment of the reference launchers (docs/reference.md §4.1).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # TP/SP comm/compute ordering
export NVTE_APPLY_QK_LAYER_SCALING=${NVTE_APPLY_QK_LAYER_SCALING:-0}
export NVTE_ALLOW_NONDETERMINISTIC_ALGO=${NVTE_ALLOW_NONDETERMINISTIC_ALGO:-1}
export NVTE_FLASH_ATTN=${NVTE_FLASH_ATTN:-0}                           # cuDNN fused attention
export NVTE_FUSED_ATTN=${NVTE_FUSED_ATTN:-1}
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache-${USER:-$(id -u)}}
export NCCL_IB_SL=${NCCL_IB_SL:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# Only the sizes that are set: the config's own layout stays otherwise.
LAYOUT=()
[[ -n "${TP_SIZE:-}" ]] && LAYOUT+=(--tp="$TP_SIZE")
[[ -n "${SP:-}" ]] && { [[ "$SP" == 1 ]] && LAYOUT+=(--sp) || LAYOUT+=(--nosp); }
[[ -n "${PP_SIZE:-}" ]] && LAYOUT+=(--pp="$PP_SIZE")
[[ -n "${CP_SIZE:-}" ]] && LAYOUT+=(--cp="$CP_SIZE")

# exec (no pipe): torchrun must receive SIGTERM directly to pass it on to the ranks.
exec torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m mugv_megatron.train --config="$CONFIG" --workdir="$WORKDIR" \
    ${LAYOUT[@]+"${LAYOUT[@]}"} "$@"
