"""The main job: bundled data → small VAE → latent shards → small MUG-DiT → held-out samples →
HTML report. Entry point `python -m main_job`; see docs/main_job.md.

Modules: `stages` (completion markers, redo, temp-then-rename), `dataset` (procedural + bundled
clips with held-out combinations), `measure` (pixel and latent learning checks), `media` (mp4s,
frame grids), `report` (loss curves and the HTML page), `pipeline` (the stages in order).
"""
