"""Preference optimisation for the flow-matching DiT: DPO, KTO, SFT regulariser, RDPO.

Losses (per sample; e = velocity MSE ‖v − v_θ(x_t, t)‖² averaged over elements, e_ref the same for
the frozen reference model, winner and loser share ε and t):
* DPO (Diffusion-DPO for flow matching): margin m = −β/2·[(e_w − e_ref,w) − (e_l − e_ref,l)],
  loss = −log σ(m). The implicit reward of a sample is r = −β/2·(e − e_ref); m = r_w − r_l.
  β absorbs Diffusion-DPO's T·ω(λ) factor (a constant for our uniform-in-t weighting).
* KTO (on absolute good/bad labels): r = −β·(e − e_ref); reference point z = stopgrad(max(0,
  mean_batch r)) (the batch estimate of KL(policy‖ref), as in KTO); value λ_D·σ(r − z) for good
  and λ_U·σ(z − r) for bad samples; loss = mean(λ_y − value).
* SFT regulariser: sft_weight × the plain flow-matching loss on the winners (DPO) or the good
  samples (KTO), so the policy keeps fitting preferred data while it moves away from rejected.
The run itself is mugv.run.driver's with mugv.run.tasks.PreferenceTask; the label data and its
iterator are framework-free (mugv.data.preference).
The reference model is the starting weights, kept frozen in the state as `ref` (saved with each
checkpoint, so a resumed run keeps the same reference). Batches from different annotation sources
are interleaved round-robin (PreferenceIterator). RDPO builds pairs without labels: a real clip is
the winner, the policy's own SDEdit-style regeneration of it (noised to `strength`, then sampled
back with mugv_jax.sample.sampler) the loser.

"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mugv import rng as rng_ref
from mugv.data.preference import batch_kind
from mugv.training import (
    PreferenceConfig,  # noqa: F401 (used by the trainer)
    shift_ratio,
)
from mugv_jax.dit.model import forward
from mugv_jax.parallel import sharding
from mugv_jax.train import objective as obj
from mugv_jax.train import rng
from mugv_jax.train import step as trainer_lib

log = logging.getLogger("mugv.preference")


# --- losses (pure) -----------------------------------------------------------------------------


def dpo_loss(err_w, ref_w, err_l, ref_l, beta: float):
    """(mean −log σ(m), m per pair) with m = −β/2·[(e_w − e_ref,w) − (e_l − e_ref,l)]."""
    margin = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -jnp.mean(jax.nn.log_sigmoid(margin)), margin


def kto_loss(err, ref_err, desirable, beta: float, lambda_d: float = 1.0, lambda_u: float = 1.0):
    """(mean loss, implicit rewards r, reference point z) for KTO on absolute labels."""
    reward = -beta * (err - ref_err)
    z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(reward), 0.0))
    value = jnp.where(desirable, lambda_d * jax.nn.sigmoid(reward - z), lambda_u * jax.nn.sigmoid(z - reward))
    lam = jnp.where(desirable, lambda_d, lambda_u)
    return jnp.mean(lam - value), reward, z


# --- trainer -------------------------------------------------------------------------------------


class PreferenceTrainer(trainer_lib.Trainer):
    """Trainer whose state also holds the frozen reference parameters `ref`."""

    def __init__(self, *args, preference: PreferenceConfig = PreferenceConfig(), **kwargs):  # noqa: B008 -- frozen
        super().__init__(*args, **kwargs)
        if self.optim.grad_accum_steps != 1:
            raise ValueError("preference training does not accumulate gradients (optim.grad_accum_steps=1)")
        self.preference = preference
        self._pref_steps: dict = {}

    def _fresh_state(self, params, seed: int):
        state = super()._fresh_state(params, seed)
        state["ref"] = jax.tree.map(jnp.copy, params)
        return state

    def state_shardings(self, abstract_state):
        out = super().state_shardings(abstract_state)
        out["ref"] = out["params"]
        return out

    def _errors(self, params, x0, eps, t, batch):
        """Per-sample velocity MSE over all frames, x0 [B, ...] with y/mask/fps for B samples."""
        b, _, frames = x0.shape[:3]
        inputs = dict(
            x=obj.noisy_latents(x0, eps, t),
            timestep=t,
            y=batch["y"],
            mask=batch["mask"],
            x_mask=jnp.ones((b, frames), bool),
            fps=batch["fps"],
            frame_indice=None,
        )
        with sharding.activation_sharding(self.mesh, self.rules):
            out = forward(params, self.model_config, self.options, **inputs)
        _, per_sample = obj.masked_frame_mse(out[:, : self.model_config.in_channels], x0 - eps, inputs["x_mask"])
        return per_sample

    def _draw(self, key, shape):
        """Timesteps and noise (mugv.rng's preference tags) for pairs/samples of latents `shape`."""
        ratio = self.preference.shift_ratio
        if ratio is None:
            ratio = shift_ratio(tuple(shape[2:]))
        t = obj.shift_t(obj.logit_normal_t(rng.normals(key, rng_ref.TAG_PREF_T, shape[0])), ratio)
        return t, rng.normals(key, rng_ref.TAG_PREF_NOISE, shape[0], tuple(shape[1:]))

    def losses(self, params, ref, batch, key):
        """(total loss, metrics) of one preference batch."""
        cfg = self.preference
        if batch_kind(batch) == "dpo":
            xw, xl = batch["latents_w"].astype(jnp.float32), batch["latents_l"].astype(jnp.float32)
            t, eps = self._draw(key, xw.shape)
            two = lambda a: jnp.concatenate([a, a])
            b2 = {k: two(batch[k]) for k in ("y", "mask", "fps")}
            x0, eps2, t2 = jnp.concatenate([xw, xl]), two(eps), two(t)
            e_w, e_l = jnp.split(self._errors(params, x0, eps2, t2, b2), 2)
            r_w, r_l = jnp.split(jax.lax.stop_gradient(self._errors(ref, x0, eps2, t2, b2)), 2)
            pref, margin = dpo_loss(e_w, r_w, e_l, r_l, cfg.beta_dpo)
            sft = jnp.mean(e_w)
            metrics = {
                "reward_margin": jnp.mean(margin),
                "accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
                "reward_w": jnp.mean(-0.5 * cfg.beta_dpo * (e_w - r_w)),
                "reward_l": jnp.mean(-0.5 * cfg.beta_dpo * (e_l - r_l)),
            }
        else:
            x0 = batch["latents"].astype(jnp.float32)
            good = batch["label"] > 0.5
            t, eps = self._draw(key, x0.shape)
            e = self._errors(params, x0, eps, t, batch)
            e_ref = jax.lax.stop_gradient(self._errors(ref, x0, eps, t, batch))
            pref, reward, z = kto_loss(
                e, e_ref, good, cfg.beta_kto, cfg.kto_desirable_weight, cfg.kto_undesirable_weight
            )
            w = good.astype(jnp.float32)
            sft = jnp.sum(e * w) / jnp.maximum(jnp.sum(w), 1.0)
            gf, bf = w, 1.0 - w
            r_good = jnp.sum(reward * gf) / jnp.maximum(jnp.sum(gf), 1.0)
            r_bad = jnp.sum(reward * bf) / jnp.maximum(jnp.sum(bf), 1.0)
            metrics = {
                "reward_margin": r_good - r_bad,
                "reward_good": r_good,
                "reward_bad": r_bad,
                "kto_reference_point": z,
            }
        total = pref + cfg.sft_weight * sft
        metrics.update(loss=total, preference_loss=pref, sft_loss=sft)
        return total, metrics

    def _pref_step_fn(self, state, batch):
        key = self.step_key(state)
        grad_fn = jax.value_and_grad(self.losses, has_aux=True)
        (loss, metrics), grads = grad_fn(state["params"], state["ref"], batch, key)
        new_state, step_metrics = self.apply_gradients(state, loss, grads)
        metrics.update(step_metrics)
        return new_state, metrics

    def _compiled(self, name, fn, state, batch, donate, extra_args: int = 0):
        key = (name, tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items())))
        if key not in self._pref_steps:
            state_sh = jax.tree.map(lambda x: x.sharding, state)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            out_sh = (state_sh, replicated) if donate else replicated
            in_sh = (state_sh, self.batch_sharding(batch)) + (replicated,) * extra_args
            self._pref_steps[key] = jax.jit(
                fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0,) if donate else ()
            )
        return self._pref_steps[key]

    def train_step(self, state, batch):
        return self._compiled("step", self._pref_step_fn, state, batch, True)(state, batch)

    def evaluate(self, state, batch, seed: int = 0, index: int = 0):
        """Metrics of the current params (no update) with noise/t drawn from key (seed, index)."""
        fn = lambda s, b, k: self.losses(s["params"], s["ref"], b, k)[1]
        return self._compiled("eval", fn, state, batch, False, extra_args=1)(state, batch, rng.key(seed, index))


# --- RDPO ----------------------------------------------------------------------------------------


def rdpo_pairs(
    params,
    model_cfg,
    options,
    batch: dict,
    null_text,
    *,
    strength: float = 0.6,
    num_steps: int = 8,
    guidance_scale: float = 1.0,
    shift: float | None = 1.0,
    seed: int = 0,
) -> dict:
    """A DPO batch from real clips: winners are `batch["latents"]`, losers the model's own
    regeneration of them, noised to t = strength·1000 and sampled back to 0 (RDPO)."""
    from mugv_jax.sample import sampler

    if not 0.0 < strength <= 1.0:
        raise ValueError(f"RDPO strength must be in (0, 1], got {strength}")
    real = np.asarray(batch["latents"], np.float32)
    b, _, f, h, w = real.shape
    length = batch["y"].shape[2]
    null = np.asarray(jax.device_get(null_text))[None, None, :length]
    velocity = sampler.make_guided_velocity_from_params(params, model_cfg, options)
    fake = sampler.sample(
        None,
        real,
        batch["y"],
        batch["mask"],
        np.repeat(null, b, 0),
        np.ones((b, length), np.int32),
        height=h * 8,
        width=w * 8,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        frame_mask=np.full((b, f), strength, np.float32),
        key=jax.random.PRNGKey(seed),
        fps=np.tile(np.asarray(batch["fps"], np.float32), 2),
        shift=shift,
        velocity_fn=velocity,
    )  # fps per row of [cond; negative]
    return {
        "latents_w": real,
        "latents_l": np.asarray(fake, np.float32),
        "y": batch["y"],
        "mask": batch["mask"],
        "fps": batch["fps"],
    }


# --- held-out evaluation -------------------------------------------------------------------------


def heldout_metrics(trainer, state, batches: Sequence[dict], seed: int) -> dict:
    sums: dict = {}
    for i, b in enumerate(batches):
        m = jax.device_get(trainer.evaluate(state, trainer.put_batch(b), seed=seed, index=i))
        for k, v in m.items():
            sums.setdefault(f"{batch_kind(b)}/{k}", []).append(float(v))
    return {f"heldout/{k}": float(np.mean(v)) for k, v in sums.items()}
