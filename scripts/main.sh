#!/usr/bin/env bash
# The main job on the bundled default data: procedural captioned clips + the bundled real videos →
# a small video VAE → latent shards → a small MUG-DiT trained with the real JAX trainer →
# text-to-video and image-to-video samples for held-out prompts, decoded to mp4 →
# ${MUGV_OUT:-outputs}/main/report.html. About 15 minutes on a 2-core CPU, offline.
# Re-running reuses finished stages (--redo=data,vae,encode,dit,sample repeats one and those after it);
# Ctrl-C leaves a resumable state. `--quick` is the shortened version the tests run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/ensure_venv.sh")"
cd "$root"
exec "$py" -m main_job --workdir="${MUGV_OUT:-outputs}/main" "$@"
