"""Optimizer and learning-rate schedule of the Megatron trainer: the JAX trainer's AdamW, exactly.

`mugv_jax.train.step.make_optimizer` is optax `clip_by_global_norm(clip) → adamw(schedule, b1, b2,
eps, weight_decay)`. Its update k (0-based, counting applied updates only) uses
lr = schedule(k): linear warmup from 0 over `warmup_steps`, then constant or cosine decay to
`final_lr_ratio`. Clipping multiplies every gradient by clip/‖g‖ when ‖g‖ ≥ clip (no epsilon,
unlike torch's clip_grad_norm_), and AdamW's decay is decoupled (applied to every parameter,
scaled by lr) — torch.optim.AdamW computes the same update.

Two implementations of the step, chosen by `build`:
  * `TorchAdamW` (CPU, or GPU without the distributed optimizer): torch.optim.AdamW over the
    model's own float32 parameters (which are the master weights).
  * `MegatronAdam` (CUDA): megatron.core's DistributedOptimizer (ZeRO-1 over data parallel)
    over a megatron DistributedDataParallel model, built with `get_megatron_optimizer`. With
    float32 parameters each rank's fp32 main weights are its shard of the parameter buffer; with
    bfloat16 parameters they are separate fp32 shards (`main_shards`), copied to the bf16
    parameters after each update and all-gathered over DP (at once, or bucket by bucket in the
    next forward under overlap_param_gather).
Both skip the whole update (moments and count untouched) when the loss or the gradient norm is
not finite, which is what the JAX trainer's `jnp.where(finite, new, old)` does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mugv.training import OptimConfig


def learning_rate(cfg: OptimConfig, count: int) -> float:
    """The learning rate of update number `count` (0-based), as optax's joined schedule."""
    if cfg.warmup_steps > 0 and count < cfg.warmup_steps:
        return cfg.learning_rate * count / max(cfg.warmup_steps, 1)
    k = count - max(cfg.warmup_steps, 0)
    if cfg.schedule == "constant":
        return cfg.learning_rate
    k = min(k, cfg.decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * k / cfg.decay_steps))
    return cfg.learning_rate * ((1.0 - cfg.final_lr_ratio) * cosine + cfg.final_lr_ratio)


def grad_norm(params, tp_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients of `params` (this rank's TP shards): TP-split tensors are
    summed over the TP group, replicated ones counted once."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    device = next(iter(params)).device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.detach().double().square().sum()
    if tp_group is not None and tp_group.size() > 1:
        dist.all_reduce(sq, group=tp_group)
    return sq.sqrt().float()


def clip_scale(norm: float, clip: float) -> float:
    """optax.clip_by_global_norm's factor."""
    return 1.0 if norm < clip else clip / norm


class TorchAdamW:
    """torch.optim.AdamW over the float32 parameters, with the JAX trainer's clipping and schedule."""

    kind = "torch_adamw"

    def __init__(self, params, cfg: OptimConfig, tp_group=None):
        self.cfg, self.tp_group = cfg, tp_group
        self.params = [p for p in params if p.requires_grad]
        # foreach=False: the per-tensor loop is what the checkpoint-resume test pins bit-exactly.
        self.opt = torch.optim.AdamW(
            self.params, lr=0.0, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False
        )
        self.count = 0  # applied updates (optax's schedule count)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def grad_norm(self) -> torch.Tensor:
        return grad_norm(self.params, self.tp_group)

    @torch.no_grad()
    def apply(self, norm: float) -> float:
        """Clip with the precomputed global norm and take one AdamW step; returns the lr used."""
        scale = clip_scale(norm, self.cfg.clip_norm)
        if scale != 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        lr = learning_rate(self.cfg, self.count)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.count += 1
        return lr

    def moments(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adam state of parameter `p` (created zero if no step was taken yet)."""
        st = self.opt.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}

    def set_count(self, count: int) -> None:
        self.count = int(count)
        for p in self.params:
            self.moments(p)
            self.opt.state[p]["step"] = torch.tensor(float(count))


class MegatronAdam:
    """megatron.core's DistributedOptimizer on a DistributedDataParallel-wrapped model."""

    kind = "megatron_distributed"

    def __init__(self, ddp_model, cfg: OptimConfig, *, bf16_params: bool = False, overlap_param_gather: bool = False):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg = cfg
        ocfg = OptimizerConfig(
            optimizer="adam",
            lr=cfg.learning_rate,
            min_lr=0.0,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.b1,
            adam_beta2=cfg.b2,
            adam_eps=cfg.eps,
            clip_grad=cfg.clip_norm,
            bf16=bf16_params,
            fp16=False,
            params_dtype=torch.bfloat16 if bf16_params else torch.float32,
            use_distributed_optimizer=True,
            overlap_param_gather=overlap_param_gather,
        )
        self.model = ddp_model
        # No overrides: megatron's default exempts biases and 1-d tensors from weight decay;
        # optax decays every parameter.
        self.opt = get_megatron_optimizer(ocfg, [ddp_model], config_overrides={})
        self.count = 0

    def distributed_optimizers(self) -> list:
        return list(getattr(self.opt, "chained_optimizers", [self.opt]))

    @property
    def data_parallel_group(self):
        """The group the main weights and moments are sharded over (DP × CP)."""
        return self.distributed_optimizers()[0].data_parallel_group

    def main_shards(self) -> dict[torch.nn.Parameter, tuple[torch.Tensor, int, int]]:
        """model parameter → (this rank's fp32 main-weight shard, start, end): the shard is
        elements [start, end) of the flattened parameter. Parameters with no element on this
        rank are absent."""
        out = {}
        for dopt in self.distributed_optimizers():
            groups = dopt.optimizer.param_groups
            for p, (gi, order) in dopt.model_param_group_index_map.items():
                r = dopt._get_model_param_range_map(p)["param"]
                out[p] = (groups[gi]["params"][order], r.start, r.end)
        return out

    STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")

    def _states(self) -> dict[torch.nn.Parameter, tuple[dict[str, torch.Tensor], int, int]]:
        """model parameter → ({param: fp32 main shard, exp_avg, exp_avg_sq}, start, end)."""
        out = {}
        for dopt in self.distributed_optimizers():
            if any(not dopt.optimizer.state[m] for g in dopt.optimizer.param_groups for m in g["params"]):
                # Zero moments, as before any update (torch's Adam then also needs its step).
                dopt.init_state_fn(dopt.optimizer, dopt.config)
                self.set_count(self.count)
            for p in dopt.model_param_group_index_map:
                r = dopt._get_model_param_range_map(p)["param"]
                tensors = dopt._get_main_param_and_optimizer_states(p)
                out[p] = ({k: tensors[k] for k in self.STATE_KEYS}, r.start, r.end)
        return out

    @torch.no_grad()
    def full_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter name, its whole fp32 main weight and Adam moments (CPU tensors of the
        parameter's shape), gathered over the DP group: each element is held by exactly one
        rank, so a sum of zero-filled copies is exact. Collective over DP."""
        states = self._states()
        out = {}
        for n, p in self.model.module.named_parameters():
            out[n] = {}
            for k in self.STATE_KEYS:
                full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if p in states:
                    tensors, start, end = states[p]
                    full[start:end] = tensors[k].reshape(-1)
                dist.all_reduce(full, group=self.data_parallel_group)
                out[n][k] = full.view(p.shape).cpu()
        return out

    @torch.no_grad()
    def load_full_states(self, tensors: dict[str, dict[str, torch.Tensor]], count: int) -> None:
        """Inverse of `full_states` (any DP size wrote them: each rank takes its ranges), then the
        model's weights from the main weights and the update count everywhere."""
        names = {p: n for n, p in self.model.module.named_parameters()}
        for p, (own, start, end) in self._states().items():
            for k in self.STATE_KEYS:
                own[k].copy_(tensors[names[p]][k].reshape(-1)[start:end].to(own[k]))
        self.set_count(count)
        for dopt in self.distributed_optimizers():
            dopt._copy_main_params_to_model_params()
        self.model.start_param_sync(force_sync=True)

    def set_count(self, count: int) -> None:
        """The update count, and Adam's own step (bias correction) for every main weight:
        per-parameter state in torch's Adam, per group in TE's / apex's fused Adam."""
        self.count = int(count)
        for dopt in self.distributed_optimizers():
            inner = dopt.optimizer
            for group in inner.param_groups:
                if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                    group["step"] = self.count
                    continue
                for m in group["params"]:
                    inner.state[m]["step"] = torch.tensor(float(self.count))

    @torch.no_grad()
    def set_main_params(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite the fp32 main weights from full (TP-local) tensors by parameter name, then
        the model's own copies from them (the release weights exact, not bf16-rounded)."""
        names = {p: n for n, p in self.model.module.named_parameters()}
        for p, (main, start, end) in self.main_shards().items():
            main.copy_(tensors[names[p]].reshape(-1)[start:end].to(main))
        for dopt in self.distributed_optimizers():
            dopt._copy_main_params_to_model_params()
        self.model.start_param_sync(force_sync=True)

    def zero_grad(self):
        self.model.zero_grad_buffer()
        self.opt.zero_grad()

    def grad_norm(self) -> torch.Tensor:
        # Copies the (already DP-reduced) main grads into the optimizer's fp32 shards first.
        self.opt.prepare_grads()
        return torch.as_tensor(float(self.opt.get_grad_norm()))

    @torch.no_grad()
    def apply(self, norm: float) -> float:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        lr = learning_rate(self.cfg, self.count)
        for group in self.opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self.cfg.weight_decay
        scale = clip_scale(norm, self.cfg.clip_norm)
        if scale != 1.0:
            # clip_grad_by_total_norm_fp32 scales by max_norm / (norm + 1e-6); pass the max_norm
            # that makes the factor exactly optax's.
            clip_grad_by_total_norm_fp32(self.opt.get_parameters(), scale * (norm + 1e-6), norm)
        self.opt.step_with_ready_grads()
        self.count += 1
        return lr


def build(
    model,
    cfg: OptimConfig,
    *,
    use_megatron: bool,
    tp_group=None,
    bf16_params: bool = False,
    overlap_param_gather: bool = False,
):
    """`MegatronAdam` when asked for (needs a megatron DDP-wrapped model), else `TorchAdamW`."""
    if use_megatron:
        return MegatronAdam(model, cfg, bf16_params=bf16_params, overlap_param_gather=overlap_param_gather)
    if bf16_params:
        raise ValueError("bfloat16 parameters need the distributed optimizer (fp32 main weights)")
    return TorchAdamW(model.parameters(), cfg, tp_group)
