"""Checkpoint files without a framework: the reader/writer contract and atomic outputs (`base`),
the release layout as `.pt`, `.safetensors` or HF shards (`release`), torch zip files
(`torchzip`), the params/EMA of a JAX trainer checkpoint (`orbax`), Megatron torch_dist
checkpoints (`torch_dist`), torch.distributed on a machine without CUDA (`torch_cpu`), and a
run's starting weights from any of them (`weights.open_weights`, what `config.init_from` reads).

Both backends and the converters read checkpoints through these readers: memory-mapped where the
format allows, one tensor at a time, numpy arrays out. Importing these modules imports no
framework; torch, orbax/tensorstore and megatron.core are imported inside the functions that need
them (`.pt` variants the numpy reader does not understand, numpy ⇄ torch bridges, DCP metadata and
the dist_checkpointing fallback, opening orbax arrays, which brings in jax through orbax's own
imports).
"""
