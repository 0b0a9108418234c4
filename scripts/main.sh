#!/usr/bin/env bash
# The main job on the bundled default data. Today: load the bundled tiny DiT checkpoint (release
# layout), sample video latents with classifier-free guidance from the bundled caption features,
# and write them to outputs/. It grows into data preparation → training → sampling as those land.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/ensure_venv.sh")"
cd "$root"
out="${MUGV_OUT:-outputs}"
exec "$py" -m mugv_jax.sample \
  --checkpoint=assets/dit_tiny/weights.safetensors --model=tiny \
  --text=assets/dit_tiny/text_features.safetensors \
  --num_frames=33 --height=64 --width=96 --steps=25 --cfg_scale=4.0 --fps=30 \
  --out="$out/sample_latents.safetensors" "$@"
