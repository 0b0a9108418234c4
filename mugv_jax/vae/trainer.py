"""The VAE trainer: model and optimizer state, the jitted training step (one compile per decode
window), held-out PSNR/SSIM, latent statistics and the release-layout export.

One step: random (frames × size) crops of the training clips → per-frame 2D encode → 8-frame
temporal encode → posterior sample → temporal decode in windows of n latents (n drawn per step
from `decoder_windows`) → per-frame 2D decode, against the objective of losses.py. The final
stage adds a small patch discriminator (hinge GAN) and can freeze the spatial autoencoder.
A non-finite loss or gradient leaves the state alone inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mugv.vae_config import TEMPORAL_GROUP, VAEConfig
from mugv_jax.backend_options import convolution_options
from mugv_jax.vae import losses
from mugv_jax.vae.checkpoint import export_release_state_dict, load, random_vae
from mugv_jax.vae.clips import CropSampler
from mugv_jax.vae.discriminator import PatchDiscriminator
from mugv_jax.vae.model import VideoVAE


def reconstruct(model: VideoVAE, x: jax.Array, window: int, noise_key: jax.Array | None):
    """Video [B, T, H, W, 3] → (reconstruction, posterior mean, clamped logvar).

    T must be a multiple of 8: every 8-frame group is encoded independently (as the release does
    for aligned chunks), then the latents are decoded `window` at a time. `noise_key=None` uses
    the posterior mean.
    """
    cfg = model.config
    b, t, h, w, c = x.shape
    k = t // TEMPORAL_GROUP
    feats = model.spatial_vae.encode_frames(x.reshape(b * t, h, w, c))
    fh, fw, fc = feats.shape[1:]
    moments = model.temporal_vae.encode_groups(feats.reshape(b * k, TEMPORAL_GROUP, fh, fw, fc))
    e = moments.shape[-1] // 2
    mean = moments[..., :e]
    logvar = jnp.clip(moments[..., e:], cfg.logvar_min, cfg.logvar_max)
    z = mean
    if noise_key is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(noise_key, mean.shape, mean.dtype)
    dec = model.temporal_vae.decode_window(z.reshape(b * k // window, window, fh, fw, e))
    y = model.spatial_vae.decode_frames(dec.reshape(b * t, fh, fw, fc))
    return y.reshape(b, t, h, w, c), mean, logvar


def _schedule(o, num_steps: int):
    warm = max(int(o.warmup_steps), 1)
    decay = max(num_steps - warm, 1)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, o.learning_rate, warm),
            optax.cosine_decay_schedule(o.learning_rate, decay, alpha=o.final_lr_ratio),
        ],
        [warm],
    )


def _optimizer(config, params) -> optax.GradientTransformation:
    o = config.optim
    opt = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(_schedule(o, config.num_steps), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    )
    if not config.freeze_spatial:
        return opt
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if str(getattr(path[0], "key", path[0])) == "spatial_vae" else "train", params
    )
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


def _init_logvar(model: VideoVAE, value: float | None) -> None:
    """Start the posterior log-variance near `value` (None: leave the random init).

    From a random init the posterior noise std is about 1 while the posterior means are about
    0.1 (the 2D features are scaled by 0.18215): the decoder then sees mostly noise and learns the
    mean frame, a soft blob without the object's colour. The KL weight is far too small to fix
    that within a short run, so the log-variance half of `quant_conv` starts at `value` instead.
    """
    if value is None:
        return
    e = model.config.embed_dim
    conv = model.temporal_vae.quant_conv.conv
    w = np.array(conv.weight[...])
    b = np.array(conv.bias[...])
    w[e:] = 0.0
    b[e:] = float(value)
    conv.weight.set_value(jnp.asarray(w))
    conv.bias.set_value(jnp.asarray(b))


class Trainer:
    def __init__(self, config, vae_cfg: VAEConfig):
        self.config = config
        self.vae_cfg = vae_cfg
        init_from = config.get("init_from", "") if hasattr(config, "get") else ""
        if init_from:
            model = load(init_from, vae_cfg)
        else:
            model = random_vae(vae_cfg, seed=config.seed)  # numpy init: no XLA compile
            _init_logvar(model, config.get("init_logvar"))
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.params = nnx.to_pure_dict(params)
        self.param_template = params
        self.opt = _optimizer(config, self.params)
        self.opt_state = self.opt.init(self.params)
        self.use_gan = config.loss.gan > 0
        if self.use_gan:
            disc = PatchDiscriminator(rngs=nnx.Rngs(config.seed + 1))
            self.d_graphdef, d_params = nnx.split(disc, nnx.Param)
            self.d_params = nnx.to_pure_dict(d_params)
            self.d_template = d_params
            self.d_opt = optax.adam(config.optim.disc_learning_rate, b1=0.5, b2=0.9)
            self.d_opt_state = self.d_opt.init(self.d_params)
        self.step = 0
        self._steps = {}
        self._eval = None
        opts = convolution_options(dict(config.compiler_options) if config.get("compiler_options") else None)
        self._jit = lambda f, **kw: jax.jit(f, compiler_options=opts, **kw)

    # pure dict ↔ module
    def model(self, params) -> VideoVAE:
        state = jax.tree.map(lambda x: x, self.param_template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.rest)

    def disc(self, params) -> PatchDiscriminator:
        state = jax.tree.map(lambda x: x, self.d_template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.d_graphdef, state)

    def tree(self) -> dict:
        t = {"params": self.params, "opt_state": self.opt_state}
        if self.use_gan:
            t.update(d_params=self.d_params, d_opt_state=self.d_opt_state)
        return t

    def set_tree(self, t: dict) -> None:
        self.params, self.opt_state = t["params"], t["opt_state"]
        if self.use_gan:
            self.d_params, self.d_opt_state = t["d_params"], t["d_opt_state"]

    def _train_step(self, window: int):
        if window in self._steps:
            return self._steps[window]
        w = self.config.loss

        def generator_loss(params, d_params, x, key, saliency_mix, gan_on):
            y, mean, logvar = reconstruct(self.model(params), x, window, key)
            terms = losses.reconstruction(x, y, w, saliency_mix)
            terms["kl"] = losses.kl(mean, logvar)
            loss = terms["rec"] + w.kl * terms["kl"]
            if self.use_gan:
                fake = self.disc(d_params)(y.reshape(-1, *y.shape[2:]))
                terms["g_adv"] = losses.hinge_g(fake)
                loss = loss + gan_on * w.gan * terms["g_adv"]
            terms["loss"] = loss
            return loss, (terms, y)

        def step(params, opt_state, d_params, d_opt_state, x, key, saliency_mix, gan_on):
            grads, (terms, y) = jax.grad(generator_loss, has_aux=True)(params, d_params, x, key, saliency_mix, gan_on)
            terms["grad_norm"] = optax.global_norm(grads)
            # A non-finite loss or gradient leaves the weights and moments alone (the run loop
            # counts it and stops after config.max_nonfinite_in_a_row).
            finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(terms["grad_norm"])
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            updates, new_opt_state = self.opt.update(grads, opt_state, params)
            params, opt_state = keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state)
            terms["finite"] = finite
            if self.use_gan:

                def d_loss(dp):
                    d = self.disc(dp)
                    real = d(x.reshape(-1, *x.shape[2:]))
                    fake = d(jax.lax.stop_gradient(y).reshape(-1, *y.shape[2:]))
                    return losses.hinge_d(real, fake)

                dl, dg = jax.value_and_grad(d_loss)(d_params)
                dg = jax.tree.map(lambda g: g * gan_on, dg)
                d_updates, d_opt_state = self.d_opt.update(dg, d_opt_state, d_params)
                d_params = optax.apply_updates(d_params, d_updates)
                terms["d_loss"] = dl
            return params, opt_state, d_params, d_opt_state, terms

        self._steps[window] = self._jit(step, donate_argnums=(0, 1, 2, 3))
        return self._steps[window]

    def train_step(self, x: np.ndarray, window: int, key, saliency_mix: float, gan_on: float) -> dict:
        fn = self._train_step(window)
        d_params = self.d_params if self.use_gan else None
        d_opt = self.d_opt_state if self.use_gan else None
        # The host batch and the two switches go to the device here, explicitly: nothing else in
        # the step may cross (the tests run it under jax.transfer_guard("disallow")).
        x, saliency_mix, gan_on = jax.device_put((np.asarray(x), np.float32(saliency_mix), np.float32(gan_on)))
        p, o, dp, do, terms = fn(self.params, self.opt_state, d_params, d_opt, x, key, saliency_mix, gan_on)
        self.params, self.opt_state = p, o
        if self.use_gan:
            self.d_params, self.d_opt_state = dp, do
        return terms

    def evaluate(self, x: np.ndarray) -> dict[str, float]:
        """Held-out PSNR/SSIM of posterior-mean reconstructions, decoded in the pipeline's windows."""
        if self._eval is None:
            k = self.config.frames // TEMPORAL_GROUP
            m = self.vae_cfg.micro_latent_frames or k
            window = max(n for n in range(1, min(m, k) + 1) if k % n == 0)

            def run(params, x):
                y, _, _ = reconstruct(self.model(params), x, window, None)
                return losses.psnr(x, y), losses.ssim(x, y)

            self._eval = self._jit(run)
        p, s = self._eval(self.params, jnp.asarray(x))
        return {"psnr": float(jnp.mean(p)), "ssim": float(jnp.mean(s))}

    def latent_stats(self, sampler: CropSampler, batches: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of posterior means over `batches` batches of training crops."""

        def moments(params, x):
            model = self.model(params)
            b, t, h, w, c = x.shape
            feats = model.spatial_vae.encode_frames(x.reshape(b * t, h, w, c))
            m = model.temporal_vae.encode_groups(feats.reshape(-1, TEMPORAL_GROUP, *feats.shape[1:]))
            return m[..., : m.shape[-1] // 2].reshape(-1, m.shape[-1] // 2)

        fn = self._jit(moments)
        rng = np.random.default_rng([seed, 2**31 - 1])
        zs = np.concatenate(
            [
                np.asarray(fn(self.params, jnp.asarray(sampler.batch(rng, self.config.batch_size))))
                for _ in range(max(batches, 1))
            ]
        )
        return zs.mean(0), np.maximum(zs.std(0), 1e-6)

    def export(self, path: str, shift: np.ndarray, scale: np.ndarray) -> None:
        model = self.model(self.params)
        c = self.vae_cfg.embed_dim
        model.shift.set_value(jnp.asarray(shift, jnp.float32).reshape(1, c, 1, 1, 1))
        model.scale.set_value(jnp.asarray(scale, jnp.float32).reshape(1, c, 1, 1, 1))
        save_release(export_release_state_dict(model), path, self.vae_cfg)


def save_release(tensors: dict[str, np.ndarray], path: str, config: VAEConfig | None = None) -> None:
    """Atomic safetensors write (0-d tensors stay 0-d: the release's scalar `logvar`), with the
    VAE's config in the metadata where `python -m converters` finds it (mugv.io.release)."""
    import json

    from mugv.io.release import VAE_CONFIG_METADATA
    from mugv.safetensors_io import save_atomic

    meta = None if config is None else {"format": "pt", VAE_CONFIG_METADATA: json.dumps(config.to_dict())}
    save_atomic(tensors, path, metadata=meta)
