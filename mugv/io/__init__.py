"""Checkpoint files without a framework, one module per format with its names, its reader and
the writer helpers the trainers need: release files as `.pt`, `.safetensors` or HF shards
(`release`) and their null-caption sidecar (`null_text`), JAX trainer checkpoints (`orbax`),
Megatron save directories (`megatron`) and torch_dist checkpoints (`torch_dist`). `spec` is the
one `FORMAT:PATH[@N]` grammar, format detection and `open_reader` for every format; `weights` a
run's starting weights from any of them (`open_weights`, what `config.init_from` reads). Beneath
them: the reader/writer contract (`base`), outputs that appear complete or not at all
(`atomic`), tensors parked on disk (`staging`), torch zip files (`torchzip`) and
torch.distributed on a machine without CUDA (`torch_cpu`). docs/architecture.md maps them.

Both backends and the converters read checkpoints through these readers: memory-mapped where the
format allows, one tensor at a time, numpy arrays out. Importing these modules imports no
framework; torch, orbax/tensorstore and megatron.core are imported inside the functions that need
them (`.pt` variants the numpy reader does not understand, numpy ⇄ torch bridges, DCP metadata and
the dist_checkpointing fallback, opening orbax arrays, which brings in jax through orbax's own
imports).
"""
