"""The JAX half of validation (mugv/run/validation.py has the set, its noise and its naming):
the mean velocity MSE of each held-out batch at each fixed t, jitted, with the Trainer's loss
and sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mugv.run.validation import ValidationSet
from mugv_jax.train import objective as obj


def local_rows(batch: dict) -> dict:
    """This process's rows of a global host batch (every process holds the same global batch)."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return batch
    return {k: np.array_split(v, n)[i] for k, v in batch.items()}


class Validator:
    """Evaluates `params` on a ValidationSet with a Trainer's loss and sharding."""

    def __init__(self, trainer, vset: ValidationSet):
        self.trainer, self.vset = trainer, vset
        self._fn = jax.jit(self._losses)

    def _losses(self, params, batch, t_values):
        """Mean velocity MSE of one batch at each t (a [len(t_values)] vector)."""
        x0, eps = batch["latents"].astype(jnp.float32), batch["noise"]
        b, _, frames = x0.shape[:3]

        def one(t):
            tb = jnp.full((b,), t * 1000.0, jnp.float32)
            inputs = dict(
                x=obj.noisy_latents(x0, eps, tb),
                timestep=tb,
                y=batch["y"],
                mask=batch["mask"],
                x_mask=jnp.ones((b, frames), bool),
                fps=batch["fps"],
                frame_indice=None,
            )
            loss, _ = self.trainer.loss_on_inputs(params, inputs, x0 - eps, tb)
            return loss

        return jax.lax.map(one, t_values)

    def per_t(self, params) -> np.ndarray:
        t = jnp.asarray(self.vset.t_values, jnp.float32)
        out = np.zeros(len(self.vset.t_values), np.float64)
        for batch in self.vset.batches:
            out += np.asarray(
                jax.device_get(self._fn(params, self.trainer.put_batch(local_rows(batch)), t)), np.float64
            )
        return out / len(self.vset.batches)

    def evaluate(self, params) -> dict[str, float]:
        """{"val/loss": mean over batches and t, "val/t0.10": ..., ...} (float, on the host)."""
        return self.vset.summarize(self.per_t(params))

    def evaluate_loss(self, params) -> float:
        return self.evaluate(params)["val/loss"]
