"""MUG-DiT on Megatron-Core: layer spec, tensor/sequence parallel model, release-checkpoint loader.

Entry point: `mugv_megatron.model.build.load(path, config)`. See docs/megatron.md. Submodules import
megatron.core, so this package file imports nothing.
"""
