"""The Megatron half of validation the driver asks for: the fixed-timestep validation loss
(mugv/run/validation.py defines the set) on the raw or EMA weights.

Every data-parallel replica evaluates its rows of each held-out global batch and the means are
averaged over the replicas (equal row counts, so this is the global mean); pipeline stages and
context-parallel ranks run the forward together through mugv_megatron.parallel.pipeline_parallel, tensor-parallel
ranks through the model. The result equals the JAX backend's on the same weights.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

from mugv.run.validation import ValidationSet
from mugv_megatron.train import objective as obj


@contextlib.contextmanager
def weights(trainer, which: str):
    """The trainer's module holding `which` weights ("raw" or "ema") inside the block."""
    if which == "raw":
        yield
        return
    if which != "ema":
        raise ValueError(f"weights must be 'raw' or 'ema', got {which!r}")
    saved = {}
    with torch.no_grad():
        for n, p in trainer.module.named_parameters():
            saved[n] = p.detach().clone()
            p.copy_(trainer.ema.shadow[n].to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in trainer.module.named_parameters():
                p.copy_(saved[n])


def forward_mean_loss(trainer, inputs: dict, target: torch.Tensor) -> torch.Tensor:
    """Mean masked-frame MSE of prepared inputs for this rank's rows, no gradients."""
    if not trainer.staged:
        loss, _ = trainer.forward_loss(inputs, target)
        return loss.detach()
    from mugv_megatron.parallel import pipeline_parallel as pipeline

    c = trainer.model_config.in_channels
    micro = [{**{k: v for k, v in inputs.items() if v is not None}, "target": target}]
    with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.bf16):
        return pipeline.forward_backward(
            trainer.model,
            micro,
            lambda out, m: obj.masked_frame_mse(out[:, :c].float(), m["target"], m["x_mask"])[0],
            forward_only=True,
        ).detach()


def validation_per_t(trainer, vset: ValidationSet) -> np.ndarray:
    """[len(t_values)] mean velocity MSE over the held-out batches at each fixed t."""
    out = np.zeros(len(vset.t_values), np.float64)
    as_t = lambda v: torch.as_tensor(np.array(v), device=trainer.device)  # noqa: E731
    was_training = trainer.module.training
    trainer.module.eval()
    try:
        with torch.no_grad(), weights(trainer, vset.weights):
            for batch in vset.batches:
                rows = trainer.local_rows(batch["latents"].shape[0])
                x0 = as_t(batch["latents"][rows]).float()
                eps = as_t(batch["noise"][rows]).float()
                b, frames = x0.shape[0], x0.shape[2]
                for i, t in enumerate(vset.t_values):
                    tb = torch.full((b,), t * 1000.0, dtype=torch.float32, device=trainer.device)
                    inputs = dict(
                        x=obj.noisy_latents(x0, eps, tb),
                        timestep=tb,
                        y=as_t(batch["y"][rows]).float(),
                        mask=as_t(batch["mask"][rows]),
                        x_mask=torch.ones((b, frames), dtype=torch.bool, device=trainer.device),
                        fps=as_t(batch["fps"][rows]).float(),
                        frame_indice=None,
                    )
                    loss = forward_mean_loss(trainer, inputs, x0 - eps)
                    if trainer.dp_size > 1:
                        dist.all_reduce(loss, group=trainer.dp_group)
                        loss = loss / trainer.dp_size
                    out[i] += float(loss)
    finally:
        trainer.module.train(was_training)
    return out / len(vset.batches)
