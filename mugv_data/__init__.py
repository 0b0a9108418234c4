"""Data preparation, the app (docs/data.md): `python -m mugv_data prepare`.

videos → `clips` (decode, `shots` split, filter, dedup, manifest) → `encode` (bucket resize/crop, VAE,
captions) → array_record shards through a tfds builder (mugv.data.shards). The trainers read the
shards with the framework-free loader in the core (mugv.data.loader); decoding, the bundled videos
and the procedural captioned clips are core modules too (mugv.data.video, .bundled, .procedural).
Only `encode` imports JAX (for the VAE).
"""
