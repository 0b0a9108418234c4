"""Per-backend parameter layouts as exact maps to and from the release schema (`mugv.schema`):
`jax` (stacked layers, kernels [in, out], heads as an axis) and `megatron` (renamed, QKV grouped
per head, tensor-parallel split rules). Pure reshapes and transposes; no jax or torch."""
