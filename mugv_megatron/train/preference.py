"""Preference optimisation (DPO, KTO, SFT regulariser) on the Megatron trainer: the losses of
`mugv_jax/train/preference.py`, in torch, on the same draws (mugv.rng's preference tags), so a
preference stage gives the same losses on either backend.

The frozen reference model is the starting weights, kept as tensors beside the module (`ref`,
saved with every checkpoint) and evaluated with `torch.func.functional_call`. Every sample of a
pair shares its timestep and noise. Batch-level quantities (KTO's reference point z, the SFT
term's normaliser over good samples) are global over the data-parallel replicas, as they are in
the JAX trainer's single global batch. Runs with TP/SP and data parallelism; pipeline and context
parallelism are refused by name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mugv import rng
from mugv.data.preference import batch_kind
from mugv.training import PreferenceConfig, shift_ratio
from mugv_megatron.train import objective as obj
from mugv_megatron.train.step import Trainer


def dpo_loss(err_w, ref_w, err_l, ref_l, beta: float):
    margin = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -F.logsigmoid(margin).mean(), margin


class PreferenceTrainer(Trainer):
    def __init__(self, *args, preference: PreferenceConfig = PreferenceConfig(), **kwargs):  # noqa: B008 -- frozen
        super().__init__(*args, **kwargs)
        if self.staged:
            raise ValueError(
                "config.mode='preference' on the megatron backend runs with tensor, sequence "
                "and data parallelism: set config.megatron.pp=1 and config.megatron.cp=1"
            )
        if self.optim.grad_accum_steps != 1:
            raise ValueError("preference training does not accumulate gradients (optim.grad_accum_steps=1)")
        self.preference = preference
        self.ref = {n: p.detach().float().clone() for n, p in self.module.named_parameters()}

    def reset_reference(self) -> None:
        """The reference is the weights the run starts from (call after loading init weights)."""
        self.ref = {n: p.detach().float().clone() for n, p in self.module.named_parameters()}

    # --- pieces ---------------------------------------------------------------------------------

    def _draws(self, seed: int, step: int, rows: slice, shape: tuple[int, ...]):
        """(t, eps) for global rows `rows` of latents shaped [B, C, T, H, W]."""
        r = np.arange(rows.start, rows.stop)
        ratio = self.preference.shift_ratio
        if ratio is None:
            ratio = shift_ratio(tuple(shape[2:]))
        u = torch.from_numpy(rng.normals(seed, step, rng.TAG_PREF_T, r, ())).to(self.device)
        t = obj.shift_t(torch.sigmoid(u) * 1000.0, ratio)
        eps = torch.from_numpy(rng.normals(seed, step, rng.TAG_PREF_NOISE, r, tuple(shape[1:]))).to(self.device)
        return t, eps

    def _errors(self, x0, eps, t, cond: dict, params: dict | None = None):
        """Per-sample velocity MSE over all frames (reference weights when `params` is given)."""
        b, frames = x0.shape[0], x0.shape[2]
        inputs = dict(
            x=obj.noisy_latents(x0, eps, t),
            timestep=t,
            y=cond["y"],
            mask=cond["mask"],
            x_mask=torch.ones((b, frames), dtype=torch.bool, device=self.device),
            fps=cond["fps"],
            frame_indice=None,
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if params is None:
                out = self.model(**inputs)
            else:
                out = torch.func.functional_call(self.module, params, args=(), kwargs=inputs)
        _, per_sample = obj.masked_frame_mse(
            out[:, : self.model_config.in_channels].float(), x0 - eps, inputs["x_mask"]
        )
        return per_sample

    def _global_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            x = x.detach().clone()
            dist.all_reduce(x, group=self.dp_group)
        return x.detach()

    def losses(self, batch: dict, seed: int, step: int, rows: slice):
        """(loss whose DP-average is the global loss, metrics of the global batch) for this rank's rows."""
        cfg = self.preference
        as_t = lambda v: torch.as_tensor(np.array(v), device=self.device)  # noqa: E731
        cond = {"y": as_t(batch["y"]).float(), "mask": as_t(batch["mask"]), "fps": as_t(batch["fps"]).float()}
        n = self.dp_size
        if batch_kind(batch) == "dpo":
            xw, xl = as_t(batch["latents_w"]).float(), as_t(batch["latents_l"]).float()
            t, eps = self._draws(seed, step, rows, (rows.stop - rows.start, *xw.shape[1:]))
            two = {k: torch.cat([v, v]) for k, v in cond.items()}
            x0, eps2, t2 = torch.cat([xw, xl]), torch.cat([eps, eps]), torch.cat([t, t])
            e_w, e_l = self._errors(x0, eps2, t2, two).chunk(2)
            with torch.no_grad():
                r_w, r_l = self._errors(x0, eps2, t2, two, self.ref).chunk(2)
            pref, margin = dpo_loss(e_w, r_w, e_l, r_l, cfg.beta_dpo)
            sft = e_w.mean()
            b = float(len(margin))
            sums = self._global_sum(
                torch.stack(
                    [
                        margin.sum(),
                        (margin > 0).float().sum(),
                        (-0.5 * cfg.beta_dpo * (e_w - r_w)).sum(),
                        (-0.5 * cfg.beta_dpo * (e_l - r_l)).sum(),
                        pref.detach() * b,
                        sft.detach() * b,
                    ]
                )
            )
            total_b = b * n
            metrics = {
                "reward_margin": sums[0] / total_b,
                "accuracy": sums[1] / total_b,
                "reward_w": sums[2] / total_b,
                "reward_l": sums[3] / total_b,
                "preference_loss": sums[4] / total_b,
                "sft_loss": sums[5] / total_b,
            }
            loss = pref + cfg.sft_weight * sft
        else:
            x0 = as_t(batch["latents"]).float()
            good = as_t(batch["label"]) > 0.5
            t, eps = self._draws(seed, step, rows, (rows.stop - rows.start, *x0.shape[1:]))
            e = self._errors(x0, eps, t, cond)
            with torch.no_grad():
                e_ref = self._errors(x0, eps, t, cond, self.ref)
            reward = -cfg.beta_kto * (e - e_ref)
            w = good.float()
            b = float(len(e))
            sums = self._global_sum(torch.stack([reward.sum(), w.sum(), (reward * w).sum(), (reward * (1 - w)).sum()]))
            z = torch.clamp(sums[0] / (b * n), min=0.0)
            lam_d, lam_u = cfg.kto_desirable_weight, cfg.kto_undesirable_weight
            value = torch.where(good, lam_d * torch.sigmoid(reward - z), lam_u * torch.sigmoid(z - reward))
            lam = torch.where(good, torch.full_like(e, lam_d), torch.full_like(e, lam_u))
            pref = (lam - value).mean()
            good_total = torch.clamp(sums[1], min=1.0)
            # Scaled by the replicas so that their average is the global mean over good samples.
            sft = (e * w).sum() * n / good_total
            bad_total = torch.clamp(b * n - sums[1], min=1.0)
            rest = self._global_sum(torch.stack([pref.detach() * b, sft.detach() / n]))
            metrics = {
                "reward_margin": sums[2] / good_total - sums[3] / bad_total,
                "reward_good": sums[2] / good_total,
                "reward_bad": sums[3] / bad_total,
                "kto_reference_point": z,
                "preference_loss": rest[0] / (b * n),
                "sft_loss": rest[1],
            }
            loss = pref + cfg.sft_weight * sft
        metrics["loss"] = metrics["preference_loss"] + cfg.sft_weight * metrics["sft_loss"]
        return loss, {k: float(v) for k, v in metrics.items()}

    # --- the step -------------------------------------------------------------------------------

    def train_step(self, batch: dict, *, local: bool = False, draws=None) -> dict:
        """One preference step on the global batch (or, local=True, this replica's rows)."""
        if draws is not None:
            raise ValueError("preference steps draw their own numbers (mugv.rng)")
        b = next(iter(batch.values())).shape[0] * (self.dp_size if local else 1)
        rows = self.local_rows(b)
        if not local:
            batch = {k: v[rows] for k, v in batch.items()}
        self.optimizer.zero_grad()
        loss, metrics = self.losses(batch, self.seed, self.step, rows)
        loss.backward()
        self._finalize_grads()
        norm = self.grad_norm()
        finite, lr = self.apply_update(metrics["loss"], norm)
        metrics.update(grad_norm=norm, learning_rate=lr, finite=float(finite), nonfinite_in_a_row=self.nonfinite)
        return metrics

    def evaluate(self, batch: dict, seed: int, index: int) -> dict:
        """Metrics of the current weights on a global batch with the draws of key (seed, index)."""
        rows = self.local_rows(next(iter(batch.values())).shape[0])
        with torch.no_grad():
            _, metrics = self.losses({k: v[rows] for k, v in batch.items()}, seed, index, rows)
        return metrics
