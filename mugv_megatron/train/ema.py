"""Exponential moving average of the float32 master weights.

Same update as the JAX trainer, after every applied step: ema = d·ema + (1 − d)·param. A skipped
(non-finite) step leaves it alone. The EMA starts as a copy of the initial weights.

Two layouts, one checkpoint format (`full_state`: one fp32 tensor per parameter, this rank's TP
shard, whole):
  * `EMA`: the torch-optimizer paths, whose parameters are the fp32 master weights; each rank
    keeps the whole TP shard.
  * `ShardedEMA`: megatron's DistributedOptimizer, whose fp32 main weights are split over the
    data-parallel group (and with bf16 parameters exist nowhere else). The EMA is split the same
    way, so it costs 4 bytes per parameter / DP instead of 4 per parameter, and is gathered
    (summed over DP, each element held by exactly one rank) only to be saved.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"optim.ema_decay must be in [0, 1], got {decay}")


class EMA:
    def __init__(self, named_params, decay: float):
        _check_decay(decay)
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

    def full_state(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, t in self.shadow.items():
            t.copy_(tensors[n])


class ShardedEMA:
    """The EMA of a `optim.MegatronAdam`'s main weights, element range by element range."""

    def __init__(self, module, optimizer, decay: float):
        _check_decay(decay)
        self.decay = decay
        self.group = optimizer.data_parallel_group
        self.params = dict(module.named_parameters())
        names = {p: n for n, p in self.params.items()}
        # name → (main-weight shard, start, end) within the flattened parameter.
        self.main = {names[p]: m for p, m in optimizer.main_shards().items()}
        self.shadow = {n: main.detach().float().clone() for n, (main, _, _) in self.main.items()}

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
        for n, (main, _, _) in self.main.items():
            e = self.shadow[n]
            e.copy_(d * e + (1.0 - d) * main.detach().float())

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole EMA (CPU tensors, the parameter's shape). Collective over DP."""
        out = {}
        for n, p in self.params.items():
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            if n in self.shadow:
                _, start, end = self.main[n]
                full[start:end] = self.shadow[n]
            dist.all_reduce(full, group=self.group)
            out[n] = full.view(p.shape).cpu()
        return out

    @torch.no_grad()
    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, t in self.shadow.items():
            _, start, end = self.main[n]
            t.copy_(tensors[n].reshape(-1)[start:end])
