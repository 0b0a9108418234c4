"""Checkpoint files without a framework: the reader/writer contract and atomic outputs (`base`),
the release layout as `.pt`, `.safetensors` or HF shards (`release`), torch zip files (`torchzip`).

Both backends and the converters read release checkpoints through `release.ReleaseReader`:
memory-mapped, one tensor at a time, numpy arrays out. Nothing here imports jax, and torch only
inside the functions that need it (writing `.pt` files, `.pt` variants the numpy reader does
not understand, numpy ⇄ torch bridges).
"""
