"""Exponential moving average of the (float32 master) weights, this rank's TP shard.

Same update as the JAX trainer, after every applied step: ema = d·ema + (1 − d)·param. A skipped
(non-finite) step leaves it alone. The EMA starts as a copy of the initial weights.
"""
from __future__ import annotations

import torch


class EMA:
    def __init__(self, named_params, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.params = {n: p for n, p in named_params}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
        for n, p in self.params.items():
            e = self.shadow[n]
            e.copy_(d * e + (1.0 - d) * p.detach().float())

    def state(self) -> dict[str, torch.Tensor]:
        return self.shadow
