"""Defaults shared by every training config (reference-trainer values, docs/reference.md §4.5)."""

import ml_collections

from mugv.training import megatron_section


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "tiny"  # mugv.config.PRESETS
    c.model_overrides = ml_collections.ConfigDict()  # DiTConfig field overrides
    c.init_from = ""  # release file (.pt/.safetensors) or jax:DIR[@STEP] ("" = random init)
    # Which weights of a jax: init_from to start from: "raw" params or the online "ema" (the
    # curriculum stages hand over the EMA; docs/training_recipe.md).
    c.init_weights = "raw"
    c.mode = "pretrain"  # "pretrain" | "preference" (mugv_jax/train/preference.py)
    c.seed = 0
    c.num_steps = 100
    c.compute_dtype = "float32"  # "bfloat16" for real runs
    c.attention = "xla"
    c.remat = "none"  # none | full | dots | dots_no_batch

    c.mesh = ml_collections.ConfigDict()
    c.mesh.ici = dict(data=-1, fsdp=1, tensor=1, context=1)  # -1: all remaining devices
    c.mesh.dcn = dict(data=1, fsdp=1, tensor=1, context=1)  # multi-slice factors
    # The pod the mesh/attention/remat/accumulation above were planned for (configs/mugv_10b.py
    # `:<pod>`): python -m mugv_jax.plan's default --devices/--kind. Not read by the trainers.
    c.target = ml_collections.ConfigDict(dict(name="", kind="", devices=0))

    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-5,
            warmup_steps=100,
            schedule="constant",
            decay_steps=0,
            final_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-10,
            weight_decay=0.0,
            clip_norm=1.0,
            ema_decay=0.9999,
            grad_accum_steps=1,
        )
    )
    c.objective = ml_collections.ConfigDict(
        dict(
            shift_num_frames=ml_collections.FieldReference(None, field_type=int),
            shift_ratio=ml_collections.FieldReference(None, field_type=float),
            i2v_prob=0.0,
            i2v_mode="first",
            caption_dropout_prob=0.1,
        )
    )

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # "synthetic" | "shards" (python -m mugv_data prepare)
    c.data.path = ""  # shards: the prepared dataset (or the --out directory prepare wrote it under)
    c.data.batch_size = 8  # shards: global batch size for every bucket
    c.data.num_workers = 0  # shards: grain worker processes
    c.data.verify = False  # shards: check every byte against index.json's CRCs at open (sizes always)
    c.data.on_bad_shard = "refuse"  # shards: "refuse" a missing/changed file, or "exclude" it (loudly)
    c.data.max_skipped_records = 100  # shards: more unreadable records than this stop the run
    # (latent frames, latent height, latent width, global batch size); one shape per batch.
    c.data.buckets = ((2, 4, 6, 8),)
    c.data.text_len = 8
    c.data.truncate_captions = False  # shards: cut captions longer than text_len (default: refuse)
    c.data.num_prompts = 4
    c.data.fps = 24.0
    # Image:video mixing (curriculum stage 1): a second child loader of single-frame buckets drawn
    # with probability image_fraction, annealed linearly from image_fraction_start to
    # image_fraction_end over anneal_steps (mugv.data.loader.MixedLoader). Off while
    # image_fraction_start and image_fraction_end are 0.
    c.data.mix = ml_collections.ConfigDict(
        dict(image_buckets=(), image_path="", image_fraction_start=0.0, image_fraction_end=0.0, anneal_steps=0)
    )

    # The Megatron backend's execution settings (mugv.training.MegatronOptions).
    c.megatron = megatron_section()

    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.async_checkpoint = True
    c.max_nonfinite_in_a_row = 10
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3))
    # Latents sampled from the EMA for the first `count` captions of the first batch, written to
    # <workdir>/samples/ every `every` steps (0 = off) and at the end.
    c.sample = ml_collections.ConfigDict(dict(every=0, count=2, steps=10, cfg_scale=2.0))
    # Held-out loss at fixed timesteps with fixed noise every `every` steps (0 = off) and at the
    # end (mugv_jax/train/validation.py).
    c.validation = ml_collections.ConfigDict(
        dict(
            every=0,
            num_batches=2,
            t_values=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
            seed=1234,
            weights="ema",
            path="",
        )
    )
    return c
