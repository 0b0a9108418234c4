#!/usr/bin/env bash
# The main job on the bundled default data. Today: train the tiny MUG-DiT with the real JAX trainer
# on caption-dependent synthetic latents, export its EMA weights in the release layout, sample every
# caption with classifier-free guidance and report whether each sample lands nearest its own
# caption's latents (outputs/main/report.md). It grows into real-video data preparation → VAE →
# training → decoded samples as those pieces land. Re-running resumes/reuses outputs/main.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/ensure_venv.sh")"
cd "$root"
exec "$py" -m mugv_jax.demo --config=configs/tiny.py --workdir="${MUGV_OUT:-outputs}/main" "$@"
