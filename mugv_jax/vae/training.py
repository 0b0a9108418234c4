"""The VAE trainer: `train_vae(config, workdir, clips=None)` (configs/vae_tiny.py, docs/vae.md).

One step: random (frames × size) crops of the training clips → per-frame 2D encode → 8-frame
temporal encode → posterior sample → temporal decode in windows of n latents (n drawn per step
from `decoder_windows`; one compile per n) → per-frame 2D decode, against the objective of
losses.py. The final stage adds a small patch discriminator (hinge GAN) and can freeze the
spatial autoencoder.

The run loop is the one every trainer uses (mugv.run.driver, with VAETask and VAEBackend below):
orbax checkpoints (`<workdir>/checkpoints/<step>/`), TensorBoard + `<workdir>/logs/metrics.jsonl`,
held-out evaluation at the start, every `eval_every` steps and at the end, SIGTERM, non-finite
steps (skipped inside the jitted step, counted, the run stopped after a limit). Held-out PSNR/SSIM are measured on the
last frames of every
clip (`data.holdout_fraction`), which training never samples.

On completion the weights go to `<workdir>/vae.safetensors` in the release layout (loadable by
`mugv_jax.vae.load(path, vae_config)`), with the latent `shift`/`scale` buffers set to the
per-channel mean/std of the posterior means of training crops, so normalised latents have
roughly zero mean and unit variance.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mugv.run import driver
from mugv.vae_config import TEMPORAL_GROUP, VAEConfig, get_vae_config
from mugv_jax import compilation_cache
from mugv_jax.vae import losses
from mugv_jax.vae.checkpoint import export_release_state_dict, load
from mugv_jax.vae.discriminator import PatchDiscriminator
from mugv_jax.vae.init import random_vae
from mugv_jax.vae.model import VideoVAE
from mugv_jax.vae.plan import first_frame_copies
from mugv_jax.vae.videos import list_videos, procedural_clips, read_videos, to_unit

log = logging.getLogger(__name__)

WEIGHTS_NAME = "vae.safetensors"
RESULT_NAME = "vae_result.json"


# --- configuration --------------------------------------------------------------------------------


def resolve_vae_config(config) -> VAEConfig:
    preset = config.vae_preset
    if isinstance(preset, str):
        return get_vae_config(preset)
    overrides = dict(preset)
    base = overrides.pop("preset", "tiny")
    for k in ("block_out_channels", "channel_multipliers", "temporal_downsample"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return get_vae_config(base, **overrides)


def _check(config, vae_cfg: VAEConfig) -> None:
    h, w = config.size
    if config.frames < TEMPORAL_GROUP or config.frames % TEMPORAL_GROUP:
        raise ValueError(f"config.frames={config.frames} must be a positive multiple of {TEMPORAL_GROUP}")
    if h % 8 or w % 8 or h < 8 or w < 8:
        raise ValueError(f"config.size={tuple(config.size)} must be positive multiples of 8")
    if config.batch_size < 1 or config.num_steps < 0:
        raise ValueError(f"config.batch_size={config.batch_size} / num_steps={config.num_steps} invalid")
    bad = [n for n in config.decoder_windows if n < 1]
    if bad:
        raise ValueError(f"config.decoder_windows must be positive, got {tuple(config.decoder_windows)}")


def _windows(config) -> list[int]:
    """Decode window sizes (latents) usable for this clip length: those dividing frames/8."""
    k = config.frames // TEMPORAL_GROUP
    ok = sorted({n for n in config.decoder_windows if k % n == 0})
    return ok or [k]


# --- data -----------------------------------------------------------------------------------------


def load_clips(config, clips: Iterable[np.ndarray] | None) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """uint8 clips [T, H, W, 3] and the (file, reason) of every video that could not be read."""
    failures: list[tuple[str, str]] = []
    if clips is not None:
        out = [np.asarray(c) for c in clips]
    elif config.data.videos == "builtin:procedural":
        n = max(8, config.data.eval_clips * 2)
        out = procedural_clips(n, frames=max(2 * config.frames, 32), size=max(config.size) * 2, seed=config.seed)
    else:
        paths = list_videos(config.data.videos)
        out = [
            f
            for _, f, _ in read_videos(
                paths, failures, max_frames=config.data.max_frames, short_side=config.data.short_side
            )
        ]
        for path, reason in failures:
            log.warning("skipped unreadable video %s: %s", path, reason)
    for i, c in enumerate(out):
        if c.ndim != 4 or c.shape[-1] != 3 or c.dtype != np.uint8:
            raise ValueError(f"training clip {i} must be uint8 [T, H, W, 3], got {c.dtype} {c.shape}")
    if not out:
        raise ValueError(f"no training clips from {config.data.videos!r} ({len(failures)} unreadable: {failures[:3]})")
    return out, failures


def first_frame_padded(clip: np.ndarray) -> np.ndarray:
    """A clip of 8k+1 frames with 7 copies of frame 0 in front: what the encode pipeline feeds
    the temporal encoder in chunked mode (the first-frame rule, mugv_jax/vae/plan.py). The 2D
    encoder works per frame, so repeating pixels equals repeating features."""
    copies = first_frame_copies(clip.shape[0])
    return np.concatenate([np.repeat(clip[:1], copies, axis=0), clip]) if copies else clip


def holdout_indices(num_clips: int, count: int) -> list[int]:
    """`count` clip indices spread evenly over the list (the first and last included)."""
    if count <= 0:
        return []
    if count >= num_clips:
        raise ValueError(f"config.data.holdout_clips={count} leaves no training clip of {num_clips}")
    return sorted({int(round(i)) for i in np.linspace(0, num_clips - 1, count)})


class CropSampler:
    """Random (frames, H, W) crops from the training clips; fixed held-out crops.

    Held out: whole clips (`holdout_clips` of them, spread over the list; they never reach
    training), else the last `holdout` fraction of every clip's frames. `first_frame=True` pads
    8k+1-frame clips with the pipeline's first-frame rule first, so a 17-frame clip trains (and
    evaluates) as the 24 frames, three latents, that encoding it produces.
    """

    def __init__(
        self,
        clips: list[np.ndarray],
        frames: int,
        size: tuple[int, int],
        holdout: float,
        holdout_clips: int = 0,
        first_frame: bool = False,
    ):
        h, w = size
        self.frames, self.size = frames, (h, w)
        self.train, self.held = [], []
        held_out = set(holdout_indices(len(clips), holdout_clips))
        self.whole_clips_held = bool(held_out)
        for i, c in enumerate(clips):
            t, ch, cw = c.shape[:3]
            if ch < h or cw < w:
                raise ValueError(f"training clip {i} is {ch}×{cw} px, smaller than config.size={size}")
            if first_frame:
                c = first_frame_padded(c)
                t = c.shape[0]
            if i in held_out:
                if t >= frames:
                    self.held.append(c)
                continue
            n_held = 0 if held_out else int(round(t * holdout))
            if holdout > 0 and not held_out and t - n_held >= frames and n_held >= frames:
                self.train.append(c[: t - n_held])
                self.held.append(c[t - n_held :])
            elif t >= frames:
                self.train.append(c)
        if not self.train:
            raise ValueError(
                f"no clip has {frames} frames for training (clip lengths "
                f"{[c.shape[0] for c in clips]}{', first-frame padded' if first_frame else ''})"
            )
        if held_out and not self.held:
            raise ValueError(f"no held-out clip has {frames} frames (config.data.holdout_clips={holdout_clips})")

    def batch(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        out = []
        for _ in range(batch_size):
            c = self.train[rng.integers(len(self.train))]
            t0 = rng.integers(c.shape[0] - self.frames + 1)
            y0 = rng.integers(c.shape[1] - self.size[0] + 1)
            x0 = rng.integers(c.shape[2] - self.size[1] + 1)
            crop = c[t0 : t0 + self.frames, y0 : y0 + self.size[0], x0 : x0 + self.size[1]]
            out.append(crop[:, :, ::-1] if rng.random() < 0.5 else crop)
        return to_unit(np.stack(out))

    def eval_set(self, count: int) -> np.ndarray | None:
        """Centre crops of the held-out frames. Whole clips held out: every `frames`-long window of
        the first `count` held clips, in steps of `frames` from the start (with the first-frame
        rule the first window is [f0 ×8], a still image: one window per clip would measure only
        those). Otherwise `count` windows, cycling through the held parts."""
        if not self.held:
            return None
        if self.whole_clips_held:
            windows = [(c, t0) for c in self.held[:count] for t0 in range(0, c.shape[0] - self.frames + 1, self.frames)]
        else:
            windows = []
            for i in range(count):
                c = self.held[i % len(self.held)]
                windows.append((c, (i // len(self.held)) * self.frames % (c.shape[0] - self.frames + 1)))
        out = []
        for c, t0 in windows:
            y0 = (c.shape[1] - self.size[0]) // 2
            x0 = (c.shape[2] - self.size[1]) // 2
            out.append(c[t0 : t0 + self.frames, y0 : y0 + self.size[0], x0 : x0 + self.size[1]])
        return to_unit(np.stack(out))


# --- the model forward used for training ----------------------------------------------------------


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


# --- state and steps ------------------------------------------------------------------------------


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
        opts = dict(config.compiler_options) if config.get("compiler_options") else None
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
        p, o, dp, do, terms = fn(
            self.params,
            self.opt_state,
            d_params,
            d_opt,
            jnp.asarray(x),
            key,
            jnp.float32(saliency_mix),
            jnp.float32(gan_on),
        )
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
        save_release(export_release_state_dict(model), path)


def save_release(tensors: dict[str, np.ndarray], path: str) -> None:
    """Atomic safetensors write (0-d tensors stay 0-d: the release's scalar `logvar`)."""
    from mugv.safetensors_io import save_atomic

    save_atomic(tensors, path)


# --- the run: a task and a backend for mugv.run.driver --------------------------------------------


def _flat(tree) -> dict[str, object]:
    # Orbax wants string keys; the param dicts have int keys (nnx.List indices). Leaves in
    # treedef order are unambiguous given the same config, which the restore side rebuilds.
    return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflat(template, flat: dict) -> object:
    leaves = [flat[k] for k in sorted(flat)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


class CropIterator:
    """Step s's training batch — random crops and a decode window drawn from (seed, s) — so the
    position is just the step and a resumed run sees the same batches."""

    def __init__(self, config, sampler: CropSampler):
        self.config, self.sampler, self.step = config, sampler, 0
        self.windows = _windows(config)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.config.seed, self.step])
        x = self.sampler.batch(rng, self.config.batch_size)
        window = self.windows[rng.integers(len(self.windows))]
        self.step += 1
        return {"x": x, "window": int(window)}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


class VAETask:
    """VAE training as a run of the shared driver: crop batches, reconstruction metrics, held-out
    PSNR/SSIM as the evaluation."""

    name = "vae"
    log_dir = "logs"

    def __init__(self, config, sampler: CropSampler, eval_x: np.ndarray):
        self.config, self.sampler, self.eval_x = config, sampler, eval_x

    def iterator(self, shard):
        if shard != (0, 1):
            raise ValueError("VAE training runs in one process (its batches are sharded over the local devices)")
        return CropIterator(self.config, self.sampler)

    def evaluation(self):
        return self.eval_x

    def evaluate_every(self) -> int:
        return int(self.config.eval_every)

    def scalars(self, batch: dict, fetched: dict, seconds: float, backend) -> dict:
        out = {f"train/{k}": v for k, v in fetched.items()}
        out.update({"loss": fetched["loss"], "train/step_time": seconds})
        return out

    def console(self, step: int, total: int, s: dict) -> str:
        parts = [
            f"vae step {step}/{total}",
            f"loss {s['loss']:.4f}",
            f"rec {s.get('train/rec', float('nan')):.4f}",
            f"{s['train/step_time']:.2f}s/step",
        ]
        return " | ".join(parts)


class VAEBackend:
    """The VAE Trainer behind the driver's backend interface (JAX, one process)."""

    name = "jax"
    is_main = True
    data_shard = (0, 1)
    recompute = "none"

    def __init__(self, config, trainer: Trainer, workdir: str, run_config: dict):
        from mugv_jax.train.checkpointing import Checkpointer

        self.config, self.trainer, self.run_config = config, trainer, run_config
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, use_async=False)
        self.checkpoint_dir = self.ckpt.directory
        self.num_devices = jax.device_count()
        self.device_kind = jax.devices()[0].device_kind
        self.step = 0
        self.before: dict | None = None
        self._nonfinite = 0

    def restore(self):
        restored = self.ckpt.restore_latest(_flat(self.trainer.tree()))
        if restored is None:
            return None
        step, flat, data_state, _ = restored
        self.trainer.set_tree(_unflat(self.trainer.tree(), flat))
        self.trainer.step = self.step = step
        self.before = {"eval/psnr": data_state.pop("psnr_before"), "eval/ssim": data_state.pop("ssim_before")}
        return {"step": step, **data_state}

    def initialize(self) -> None:
        pass  # the Trainer starts from config.init_from or a random VAE

    def train_step(self, batch: dict):
        s, w = self.trainer.step, self.config.loss
        key = jax.random.fold_in(jax.random.key(self.config.seed), s)
        sal = 1.0 if 0 <= w.saliency_start_step <= s else 0.0
        gan_on = 1.0 if self.trainer.use_gan and s >= w.gan_start_step else 0.0
        terms = self.trainer.train_step(batch["x"], batch["window"], key, sal, gan_on)
        self.trainer.step = self.step = s + 1
        finite = bool(jax.device_get(terms.pop("finite")))
        self._nonfinite = 0 if finite else self._nonfinite + 1
        return terms

    def fetch(self, terms) -> dict:
        return {k: float(v) for k, v in jax.device_get(terms).items()}

    def nonfinite_in_a_row(self, terms) -> int:
        return self._nonfinite

    def skipped(self) -> int:
        return 0

    def evaluate(self, eval_x) -> dict:
        ev = self.trainer.evaluate(eval_x)
        vals = {"eval/psnr": ev["psnr"], "eval/ssim": ev["ssim"]}
        if self.before is None:
            self.before = dict(vals)
        return vals

    def save(self, data_state: dict, *, force: bool = False) -> None:
        extra = {"psnr_before": self.before["eval/psnr"], "ssim_before": self.before["eval/ssim"]}
        self.ckpt.save(self.step, _flat(self.trainer.tree()), {**data_state, **extra}, self.run_config, force=True)

    def checkpoints(self) -> list[str]:
        return [os.path.join(self.ckpt.directory, str(s)) for s in self.ckpt.steps()]

    def any_process(self, flag: bool) -> bool:
        return flag

    def finish(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None


# --- entry point ----------------------------------------------------------------------------------


def train_vae(config, workdir: str, clips: Iterable[np.ndarray] | None = None, progress: bool = True) -> dict:
    """Train (or resume) a VAE; returns {"weights", "vae_config", "psnr_before", "psnr_after",
    "ssim_before", "ssim_after", "steps", "skipped_videos", "shift", "scale"}.

    Resumes from `<workdir>/checkpoints`; a finished run (its weights and result file present,
    `steps` done) returns its stored result without building anything. The loop is the shared run
    driver's (mugv.run.driver: checkpoints, logs, evaluation cadence, SIGTERM, non-finite steps);
    progress is its console line every `log_every` steps (`progress` is kept for callers).
    """
    vae_cfg = resolve_vae_config(config)
    _check(config, vae_cfg)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    compilation_cache.setup(compilation_cache.workdir_cache_dir(workdir))
    weights = os.path.join(workdir, WEIGHTS_NAME)
    result_path = os.path.join(workdir, RESULT_NAME)
    if os.path.isfile(result_path) and os.path.isfile(weights):
        with open(result_path) as f:
            done = json.load(f)
        if done.get("steps") == config.num_steps and done.get("vae_config") == vae_cfg.to_dict():
            done["vae_config"] = vae_cfg
            return done

    data, failures = load_clips(config, clips)
    sampler = CropSampler(
        data,
        config.frames,
        tuple(config.size),
        config.data.holdout_fraction,
        config.data.get("holdout_clips", 0),
        config.data.get("first_frame", False),
    )
    eval_x = sampler.eval_set(config.data.eval_clips)
    if eval_x is None:
        log.warning(
            "clips too short to hold out %s of their frames; evaluating on training crops", config.data.holdout_fraction
        )
        eval_x = sampler.batch(np.random.default_rng([config.seed, 2**31 - 2]), config.data.eval_clips)

    trainer = Trainer(config, vae_cfg)
    config_json = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else {}
    config_json["vae_config"] = vae_cfg.to_dict()
    backend = VAEBackend(config, trainer, workdir, config_json)
    try:
        summary = driver.run(config, workdir, backend, VAETask(config, sampler, eval_x), resolved=config_json)
    finally:
        backend.finish()
    before = backend.before["eval/psnr"], backend.before["eval/ssim"]
    last = summary["evaluations"][-1] if summary["evaluations"] else None
    after = (
        {"psnr": last["eval/psnr"], "ssim": last["eval/ssim"]}
        if last and last["step"] == trainer.step
        else trainer.evaluate(eval_x)
    )
    shift, scale = trainer.latent_stats(sampler, config.data.stats_batches, config.seed)
    trainer.export(weights, shift, scale)
    with open(os.path.join(workdir, "vae_config.json"), "w") as f:
        json.dump(vae_cfg.to_dict(), f, indent=1)

    result = {
        "weights": weights,
        "vae_config": vae_cfg.to_dict(),
        "psnr_before": before[0],
        "psnr_after": after["psnr"],
        "ssim_before": before[1],
        "ssim_after": after["ssim"],
        "steps": trainer.step,
        "skipped_videos": [list(f) for f in failures],
        "shift": shift.tolist(),
        "scale": scale.tolist(),
    }
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, result_path)
    result["vae_config"] = vae_cfg
    return result
