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
The reference model is the starting weights, kept frozen in the state as `ref` (saved with each
checkpoint, so a resumed run keeps the same reference). Batches from different annotation sources
are interleaved round-robin (PreferenceIterator). RDPO builds pairs without labels: a real clip is
the winner, the policy's own SDEdit-style regeneration of it (noised to `strength`, then sampled
back with mugv_jax.sampler) the loser.

Label data (docs/training_recipe.md): JSONL, one record per line, either a pair
  {"source": "motion", "prompt": "...", "winner": "clip_a", "loser": "clip_b"}
or an absolute label
  {"source": "physics", "prompt": "...", "clip": "clip_c", "label": "good" | "bad"}
with clips in a directory as <clip id>.safetensors holding latents [C, F, H, W], y [L, D],
mask [L] and fps [] (the caption's T5 features travel with the clip).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mugv_jax import objective as obj
from mugv_jax import sharding
from mugv_jax import trainer as trainer_lib
from mugv_jax.dit.model import forward

log = logging.getLogger("mugv.preference")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    beta_dpo: float = 200.0
    beta_kto: float = 200.0
    sft_weight: float = 0.1
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    # Timesteps t = sigmoid(u)·1000 (logit-normal) shifted by this ratio (None = resolution rule).
    shift_ratio: float | None = None


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

def batch_kind(batch: dict) -> str:
    if "latents_w" in batch and "latents_l" in batch:
        return "dpo"
    if "latents" in batch and "label" in batch:
        return "kto"
    raise ValueError(f"a preference batch needs latents_w/latents_l (pairs) or latents/label (KTO); "
                     f"got keys {sorted(batch)}")


class PreferenceTrainer(trainer_lib.Trainer):
    """Trainer whose state also holds the frozen reference parameters `ref`."""

    def __init__(self, *args, preference: PreferenceConfig = PreferenceConfig(), **kwargs):
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
        inputs = dict(x=obj.noisy_latents(x0, eps, t), timestep=t, y=batch["y"], mask=batch["mask"],
                      x_mask=jnp.ones((b, frames), bool), fps=batch["fps"], frame_indice=None)
        with sharding.activation_sharding(self.mesh, self.rules):
            out = forward(params, self.model_config, self.options, **inputs)
        _, per_sample = obj.masked_frame_mse(out[:, : self.model_config.in_channels], x0 - eps, inputs["x_mask"])
        return per_sample

    def _draw(self, key, shape):
        k_t, k_eps = jax.random.split(key)
        ratio = self.preference.shift_ratio
        if ratio is None:
            ratio = obj.shift_ratio(tuple(shape[2:]))
        t = obj.shift_t(obj.sample_logit_normal_t(k_t, shape[0]), ratio)
        return t, jax.random.normal(k_eps, shape, jnp.float32)

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
            metrics = {"reward_margin": jnp.mean(margin), "accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
                       "reward_w": jnp.mean(-0.5 * cfg.beta_dpo * (e_w - r_w)),
                       "reward_l": jnp.mean(-0.5 * cfg.beta_dpo * (e_l - r_l))}
        else:
            x0 = batch["latents"].astype(jnp.float32)
            good = batch["label"] > 0.5
            t, eps = self._draw(key, x0.shape)
            e = self._errors(params, x0, eps, t, batch)
            e_ref = jax.lax.stop_gradient(self._errors(ref, x0, eps, t, batch))
            pref, reward, z = kto_loss(e, e_ref, good, cfg.beta_kto, cfg.kto_desirable_weight,
                                       cfg.kto_undesirable_weight)
            w = good.astype(jnp.float32)
            sft = jnp.sum(e * w) / jnp.maximum(jnp.sum(w), 1.0)
            gf, bf = w, 1.0 - w
            r_good = jnp.sum(reward * gf) / jnp.maximum(jnp.sum(gf), 1.0)
            r_bad = jnp.sum(reward * bf) / jnp.maximum(jnp.sum(bf), 1.0)
            metrics = {"reward_margin": r_good - r_bad, "reward_good": r_good, "reward_bad": r_bad,
                       "kto_reference_point": z}
        total = pref + cfg.sft_weight * sft
        metrics.update(loss=total, preference_loss=pref, sft_loss=sft)
        return total, metrics

    def _pref_step_fn(self, state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(self.losses, has_aux=True)
        (loss, metrics), grads = grad_fn(state["params"], state["ref"], batch, key)
        new_state, step_metrics = self.apply_gradients(state, loss, grads)
        metrics.update(step_metrics)
        return new_state, metrics

    def _compiled(self, name, fn, state, batch, donate):
        key = (name, tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items())))
        if key not in self._pref_steps:
            state_sh = jax.tree.map(lambda x: x.sharding, state)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            out_sh = (state_sh, replicated) if donate else replicated
            self._pref_steps[key] = jax.jit(fn, in_shardings=(state_sh, self.batch_sharding(batch)),
                                            out_shardings=out_sh, donate_argnums=(0,) if donate else ())
        return self._pref_steps[key]

    def train_step(self, state, batch):
        return self._compiled("step", self._pref_step_fn, state, batch, True)(state, batch)

    def evaluate(self, state, batch, seed: int = 0):
        """Metrics of the current params (no update) with noise/t drawn from `seed` (fixed)."""
        fn = lambda s, b: self.losses(s["params"], s["ref"], b, jax.random.PRNGKey(seed))[1]
        return self._compiled("eval", fn, state, batch, False)(state, batch)


# --- label data ----------------------------------------------------------------------------------

def read_labels(path: str) -> list[dict]:
    """Records of a label JSONL file, checked; errors name the file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(r, dict) or not isinstance(r.get("source"), str):
                raise ValueError(f"{path}:{n}: every record needs a string 'source'")
            if "winner" in r or "loser" in r:
                if not (isinstance(r.get("winner"), str) and isinstance(r.get("loser"), str)):
                    raise ValueError(f"{path}:{n}: a pair needs string 'winner' and 'loser' clip ids")
                r["kind"] = "dpo"
            elif "clip" in r:
                if r.get("label") not in ("good", "bad"):
                    raise ValueError(f"{path}:{n}: 'label' must be 'good' or 'bad', got {r.get('label')!r}")
                r["kind"] = "kto"
            else:
                raise ValueError(f"{path}:{n}: a record is a pair (winner, loser) or a label (clip, label)")
            out.append(r)
    if not out:
        raise ValueError(f"{path}: no label records")
    return out


class ClipStore:
    """Clips as <dir>/<clip id>.safetensors (latents, y, mask, fps); cached after the first read."""

    def __init__(self, directory: str):
        self.directory = directory
        self._cache: dict = {}

    def get(self, clip_id: str) -> dict:
        if clip_id not in self._cache:
            from safetensors.numpy import load_file
            path = os.path.join(self.directory, f"{clip_id}.safetensors")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"clip {clip_id!r}: no {path}")
            d = load_file(path)
            missing = {"latents", "y", "mask", "fps"} - set(d)
            if missing:
                raise ValueError(f"{path}: missing {sorted(missing)}")
            self._cache[clip_id] = d
        return self._cache[clip_id]


def write_clip(directory: str, clip_id: str, latents, y, mask, fps) -> None:
    from mugv_jax.safetensors_io import save_atomic
    save_atomic({"latents": np.asarray(latents, np.float32), "y": np.asarray(y, np.float32),
                 "mask": np.asarray(mask, np.int32), "fps": np.asarray(fps, np.float32)},
                os.path.join(directory, f"{clip_id}.safetensors"))


class PreferenceIterator:
    """Batches of `batch_size` records from one annotation source at a time, sources interleaved
    round-robin (sorted by name); within a source a fresh permutation per epoch from (seed, source,
    epoch). Step i's batch is a pure function of i, so the state is just the step."""

    def __init__(self, records: Sequence[dict], store, batch_size: int, seed: int = 0):
        self.store, self.batch_size, self.seed, self.step = store, int(batch_size), int(seed), 0
        self.sources: dict[str, list[dict]] = {}
        for r in records:
            self.sources.setdefault(r["source"], []).append(r)
        self.names = sorted(self.sources)
        for name, rs in self.sources.items():
            kinds = {r["kind"] for r in rs}
            if len(kinds) != 1:
                raise ValueError(f"annotation source {name!r} mixes pairs and labels; give each its own source")
            if len(rs) < self.batch_size:
                raise ValueError(f"annotation source {name!r} has {len(rs)} records, fewer than the batch "
                                 f"size {self.batch_size}")

    def __iter__(self):
        return self

    def batch(self, step: int) -> dict:
        si = step % len(self.names)
        name = self.names[si]
        rs = self.sources[name]
        per_epoch = len(rs) // self.batch_size
        visit = step // len(self.names)
        epoch, j = divmod(visit, per_epoch)
        order = np.random.default_rng([self.seed, si, epoch]).permutation(len(rs))
        chosen = [rs[k] for k in order[j * self.batch_size:(j + 1) * self.batch_size]]
        return self._collate(chosen, name)

    def _collate(self, rs, name) -> dict:
        def stack(key, ids):
            arrs = [self.store.get(i)[key] for i in ids]
            shapes = {a.shape for a in arrs}
            if len(shapes) != 1:
                raise ValueError(f"annotation source {name!r}: clips {ids} have different {key} shapes "
                                 f"{sorted(shapes)}; put one shape per source")
            return np.stack(arrs)
        if rs[0]["kind"] == "dpo":
            w, l = [r["winner"] for r in rs], [r["loser"] for r in rs]
            return {"latents_w": stack("latents", w).astype(np.float32),
                    "latents_l": stack("latents", l).astype(np.float32),
                    "y": stack("y", w)[:, None].astype(np.float32), "mask": stack("mask", w).astype(np.int32),
                    "fps": stack("fps", w).reshape(-1).astype(np.float32)}
        ids = [r["clip"] for r in rs]
        return {"latents": stack("latents", ids).astype(np.float32), "y": stack("y", ids)[:, None].astype(np.float32),
                "mask": stack("mask", ids).astype(np.int32), "fps": stack("fps", ids).reshape(-1).astype(np.float32),
                "label": np.array([r["label"] == "good" for r in rs], np.float32)}

    def __next__(self) -> dict:
        b = self.batch(self.step)
        self.step += 1
        return b

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def write_synthetic(directory: str, *, latent_shape=(2, 4, 4), in_channels=24, text_dim=64, text_len=8,
                    num_prompts=8, pairs_per_prompt=2, seed=0, artifact=0.7, labels: bool = True) -> str:
    """A labelled toy set in the documented format: winners/good clips are the caption's smooth
    pattern (SyntheticTextToLatent), losers/bad ones carry a checkerboard artifact of random sign
    and amplitude. Pairs go to source "motion", good/bad labels of the same clips (unless
    `labels=False`) to "physics". Writes <dir>/labels.jsonl and <dir>/clips/; returns its path."""
    from mugv_jax.data import Bucket, SyntheticTextToLatent
    src = SyntheticTextToLatent([Bucket(*latent_shape, 1)], in_channels=in_channels, text_dim=text_dim,
                                text_len=text_len, num_prompts=num_prompts, seed=seed)
    patterns = src.patterns(src.buckets[0])
    f, h, w = latent_shape
    checker = ((np.indices((f, h, w)).sum(0) % 2) * 2 - 1).astype(np.float32)
    rng = np.random.default_rng([seed, 7])
    clips = os.path.join(directory, "clips")
    os.makedirs(clips, exist_ok=True)
    lines = []
    for p in range(num_prompts):
        for k in range(pairs_per_prompt):
            amp = artifact * (0.5 + rng.random()) * rng.choice([-1.0, 1.0])
            chan = rng.standard_normal((in_channels, 1, 1, 1)).astype(np.float32)
            good, bad = f"p{p}_good{k}", f"p{p}_bad{k}"
            write_clip(clips, good, patterns[p], src.text[p], src.text_mask[p], src.fps)
            write_clip(clips, bad, patterns[p] + amp * chan * checker, src.text[p], src.text_mask[p], src.fps)
            lines.append({"source": "motion", "prompt": f"prompt {p}", "winner": good, "loser": bad})
            if labels:
                lines.append({"source": "physics", "prompt": f"prompt {p}", "clip": good, "label": "good"})
                lines.append({"source": "physics", "prompt": f"prompt {p}", "clip": bad, "label": "bad"})
    path = os.path.join(directory, "labels.jsonl")
    with open(path + ".tmp", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in lines)
    os.replace(path + ".tmp", path)
    return path


# --- RDPO ----------------------------------------------------------------------------------------

def rdpo_pairs(params, model_cfg, options, batch: dict, null_text, *, strength: float = 0.6,
               num_steps: int = 8, guidance_scale: float = 1.0, shift: float | None = 1.0, seed: int = 0) -> dict:
    """A DPO batch from real clips: winners are `batch["latents"]`, losers the model's own
    regeneration of them, noised to t = strength·1000 and sampled back to 0 (RDPO)."""
    from mugv_jax import sampler
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"RDPO strength must be in (0, 1], got {strength}")
    real = np.asarray(batch["latents"], np.float32)
    b, _, f, h, w = real.shape
    length = batch["y"].shape[2]
    null = np.asarray(jax.device_get(null_text))[None, None, :length]
    velocity = sampler.make_guided_velocity_from_params(params, model_cfg, options)
    fake = sampler.sample(None, real, batch["y"], batch["mask"], np.repeat(null, b, 0),
                          np.ones((b, length), np.int32), height=h * 8, width=w * 8, num_steps=num_steps,
                          guidance_scale=guidance_scale, frame_mask=np.full((b, f), strength, np.float32),
                          key=jax.random.PRNGKey(seed), fps=np.tile(np.asarray(batch["fps"], np.float32), 2),
                          shift=shift, velocity_fn=velocity)  # fps per row of [cond; negative]
    return {"latents_w": real, "latents_l": np.asarray(fake, np.float32), "y": batch["y"],
            "mask": batch["mask"], "fps": batch["fps"]}


# --- the run ---------------------------------------------------------------------------------------

def _config_pieces(config):
    from mugv_jax import mesh as mesh_lib
    from mugv_jax import train as train_lib
    from mugv_jax.dit.model import RuntimeOptions
    model_cfg = train_lib.model_config_from(config)
    options = RuntimeOptions(compute_dtype=config.compute_dtype, attention=config.attention, remat=config.remat)
    optim = train_lib._dataclass_from(trainer_lib.OptimConfig, config.optim)
    objective = train_lib._dataclass_from(obj.ObjectiveConfig, config.objective)
    pref = dict(config.preference)
    pref_cfg = train_lib._dataclass_from(PreferenceConfig, {k: v for k, v in pref.items()
                                                             if k in {f.name for f in dataclasses.fields(PreferenceConfig)}})
    mesh = mesh_lib.build_mesh(dict(config.mesh.ici), dict(config.mesh.get("dcn", {}) or {}))
    trainer = PreferenceTrainer(model_cfg, options, optim, objective, mesh, preference=pref_cfg)
    return model_cfg, trainer


def _iterator(config, labels_key: str, seed: int):
    p = config.preference
    path = p[labels_key]
    if not path:
        raise ValueError(f"config.preference.{labels_key} must name a label JSONL file")
    clips = p.clips or os.path.join(os.path.dirname(os.path.abspath(path)), "clips")
    return PreferenceIterator(read_labels(path), ClipStore(clips), int(p.batch_size), seed=seed)


def heldout_metrics(trainer, state, batches: Sequence[dict], seed: int) -> dict:
    sums: dict = {}
    for i, b in enumerate(batches):
        m = jax.device_get(trainer.evaluate(state, trainer.put_batch(b), seed=seed + i))
        for k, v in m.items():
            sums.setdefault(f"{batch_kind(b)}/{k}", []).append(float(v))
    return {f"heldout/{k}": float(np.mean(v)) for k, v in sums.items()}


def train_preference(config, workdir: str) -> dict:
    """Preference fine-tuning run (config.mode='preference'): resumes like mugv_jax.train."""
    from mugv_jax import checkpointing
    from mugv_jax import train as train_lib
    from mugv_jax.metrics import MetricsWriter
    model_cfg, trainer = _config_pieces(config)
    p = config.preference
    os.makedirs(workdir, exist_ok=True)
    resolved = json.loads(config.to_json_best_effort())
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.keep_checkpoints),
                                      use_async=bool(config.async_checkpoint))
    it = _iterator(config, "labels", int(config.seed))
    restored = ckpt.restore_latest(trainer.abstract_state())
    if restored is not None:
        _, state, data_state, _ = restored
        it.set_state(data_state)
    else:
        params = (train_lib._init_params_from(config.init_from, model_cfg, config.get("init_weights", "raw"))
                  if config.init_from else None)
        state = trainer.init_state(int(config.seed), params)
    heldout = []
    if p.heldout_labels:
        h_it = _iterator(config, "heldout_labels", int(p.heldout_seed))
        heldout = [h_it.batch(i) for i in range(max(int(p.heldout_batches), len(h_it.names)))]
    step = int(jax.device_get(state["step"]))
    total = int(config.num_steps)
    writer = MetricsWriter(os.path.join(workdir, "tensorboard"), enabled=jax.process_index() == 0)
    summary = {"step": step, "heldout": []}
    every = int(p.eval_every)

    def evaluate():
        m = heldout_metrics(trainer, state, heldout, int(p.heldout_seed))
        writer.write(step, m)
        summary["heldout"].append({"step": step, **m})

    try:
        if heldout and restored is None:
            evaluate()
        while step < total:
            batch = next(it)
            state, metrics = trainer.train_step(state, trainer.put_batch(batch))
            step += 1
            m = {f"{batch_kind(batch)}/{k}": float(v) for k, v in jax.device_get(metrics).items()}
            if step % int(config.log_every) == 0 or step == total:
                writer.write(step, m)
                log.info("step %d/%d %s", step, total, " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())))
            if int(jax.device_get(state["nonfinite"])) >= int(config.max_nonfinite_in_a_row):
                raise train_lib.NonFiniteLossError(f"{config.max_nonfinite_in_a_row} non-finite preference "
                                                   f"steps in a row at step {step}")
            if heldout and every > 0 and (step % every == 0 or step == total):
                evaluate()
            if step % int(config.checkpoint_every) == 0 or step == total:
                ckpt.save(step, state, it.get_state(), {**resolved, "model": model_cfg.to_dict()})
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    summary.update(step=step, state=state, stopped_by="num_steps")
    return summary
