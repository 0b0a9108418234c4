"""The MUG-V data pipeline (issue 10). See docs/data.md.

videos → `clips` (decode, `shots` split, filter, dedup, manifest) → `encode` (bucket resize/crop, VAE,
captions) → `shards` (array_record via a tfds builder) → `loader` (grain, bucketed, resumable).

The loader side (`shards`, `loader`, `reference_format`, `procedural`, `clips`, `text` hashing) is
numpy-only so the Megatron trainer can use it; only `encode` imports JAX (for the VAE).
"""
