"""Validation loss at fixed timesteps on a held-out set with fixed noise (MLPerf-style).

The training loss is noisy: every step draws new timesteps, noise, conditioning frames and caption
dropout. Validation removes all of that: a fixed list of held-out batches, one fixed noise tensor
per batch (drawn from (seed, batch index)), every batch evaluated at each t in `t_values` (fractions
of the 0..1000 range, no shift applied: the buckets are the timesteps themselves), every frame
generated and no caption dropout. The result is a deterministic function of the parameters, so
curves from different runs and checkpoints are comparable, and it is what the post-hoc EMA sweep
minimises.

Config (`config.validation`): every (steps; 0 = off), num_batches, t_values, seed, weights ("ema" or
"raw"), path (shards: a held-out prepared dataset; synthetic: batches far past the training
indices, i.e. fresh caption draws).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mugv_jax import objective as obj

DEFAULT_T_VALUES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Synthetic held-out batches start here: far from any index a training run reaches.
SYNTHETIC_OFFSET = 1_000_000_000


def t_key(t: float) -> str:
    return f"val/t{t:.2f}"


class Validator:
    """Evaluates `params` on fixed batches at fixed timesteps with a Trainer's loss and sharding."""

    def __init__(self, trainer, batches: Sequence[dict], *, t_values: Sequence[float] = DEFAULT_T_VALUES,
                 seed: int = 0):
        if not batches:
            raise ValueError("validation needs at least one held-out batch (config.validation.num_batches)")
        bad = [t for t in t_values if not 0.0 <= float(t) <= 1.0]
        if bad or not t_values:
            raise ValueError(f"config.validation.t_values must be fractions in [0, 1], got {list(t_values)}")
        self.trainer = trainer
        self.t_values = tuple(float(t) for t in t_values)
        self.batches = []
        for i, b in enumerate(batches):
            b = {k: np.asarray(v) for k, v in b.items() if k in ("latents", "y", "mask", "fps")}
            noise = np.random.default_rng([int(seed), i]).standard_normal(b["latents"].shape).astype(np.float32)
            self.batches.append({**b, "noise": noise})
        self._fn = jax.jit(self._losses)

    def _losses(self, params, batch, t_values):
        """Mean velocity MSE of one batch at each t (a [len(t_values)] vector)."""
        x0, eps = batch["latents"].astype(jnp.float32), batch["noise"]
        b, _, frames = x0.shape[:3]

        def one(t):
            tb = jnp.full((b,), t * 1000.0, jnp.float32)
            inputs = dict(x=obj.noisy_latents(x0, eps, tb), timestep=tb, y=batch["y"], mask=batch["mask"],
                          x_mask=jnp.ones((b, frames), bool), fps=batch["fps"], frame_indice=None)
            loss, _ = self.trainer.loss_on_inputs(params, inputs, x0 - eps, tb)
            return loss

        return jax.lax.map(one, t_values)

    def evaluate(self, params) -> dict[str, float]:
        """{"val/loss": mean over batches and t, "val/t0.10": ..., ...} (float, on the host)."""
        t = jnp.asarray(self.t_values, jnp.float32)
        per_t = np.zeros(len(self.t_values), np.float64)
        for batch in self.batches:
            per_t += np.asarray(jax.device_get(self._fn(params, self.trainer.put_batch(batch), t)), np.float64)
        per_t /= len(self.batches)
        out = {"val/loss": float(per_t.mean())}
        out.update({t_key(t): float(v) for t, v in zip(self.t_values, per_t)})
        return out

    def evaluate_loss(self, params) -> float:
        return self.evaluate(params)["val/loss"]


def heldout_batches(config, model_cfg) -> list[dict]:
    """The held-out batches a run's config describes (see the module docstring)."""
    v = config.validation
    n = int(v.num_batches)
    if config.data.source == "shards" or v.get("path"):
        if not v.get("path"):
            raise ValueError("config.validation.path must name a held-out prepared dataset when "
                             "config.data.source='shards'")
        from mugv_data.loader import ShardLoader
        loader = ShardLoader(v.path, int(config.data.batch_size), text_len=int(config.data.text_len),
                             seed=int(v.seed))
        out = []
        for _ in range(n):
            b = next(loader)
            out.append({k: b[k] for k in ("latents", "y", "mask", "fps")})
        loader.close()
        return out
    from mugv_jax import train as train_lib
    source = train_lib.build_source(config, model_cfg)
    return [{k: v_ for k, v_ in source.batch(SYNTHETIC_OFFSET + i).items() if k != "prompt_id"}
            for i in range(n)]


def from_config(config, trainer) -> Validator | None:
    """The run's Validator, or None when config.validation.every is 0 (or the section is absent)."""
    v = config.get("validation")
    if v is None or int(v.every) <= 0:
        return None
    return Validator(trainer, heldout_batches(config, trainer.model_config),
                     t_values=tuple(v.t_values), seed=int(v.seed))
