"""Run megatron.core's DistributedOptimizer on a machine without CUDA (tests, CPU debugging).

megatron.core 0.16.1's optimizer assumes CUDA in three ways, none of which is about the math:
  * it sorts parameters by `param.type()` and accepts only 'torch.cuda.{Float,Half,BFloat16}Tensor'
    (distrib_optimizer.py `_build_model_and_main_param_groups`; clip_grads asserts the same);
  * it allocates flags and scalars with `device='cuda'` (optimizer.py: the unit loss scale;
    clip_grads.py and utils.py's local multi-tensor L2 norm: the norm accumulator);
  * the rest (grad/param buffers, the DP gather of the optimizer state) uses
    `torch.cuda.current_device()`, which the CPU shim (`mugv.io.torch_cpu`) already points at the CPU.
`apply()` makes CPU tensors report their CUDA type name when `.type()` is called without
arguments, and redirects `torch.tensor`/`torch.zeros(device='cuda')` to the CPU inside those
three megatron modules only. The optimizer itself (torch AdamW without TE/apex), the DDP buckets,
reduce-scatter/all-gather over gloo and the checkpoint exchange then run unchanged, so the CPU
tests exercise megatron's own sharding, main-weight and checkpoint code. What CUDA adds (streams,
NCCL, TE's fused Adam, bf16 kernels) is only checked on a GPU (docs/megatron_training.md).

Process-wide and one-way: meant for a test worker or a CPU debugging session, never applied
when CUDA is present.
"""

from __future__ import annotations

import types

import torch

from mugv.io import torch_cpu

_STATE: dict[str, object] = {}


def is_applied() -> bool:
    return bool(_STATE)


def _cpu_device(factory):
    def make(*args, **kwargs):
        if str(kwargs.get("device")) == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


class _TorchOnCpu(types.ModuleType):
    """`torch` as those modules see it: everything is torch's, except the two factories."""

    def __getattr__(self, name):
        return getattr(torch, name)


def apply() -> bool:
    """Install (once) when CUDA is absent; returns whether it is installed."""
    if torch.cuda.is_available():
        return False
    if _STATE:
        return True
    torch_cpu.apply()
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as utils

    original_type = torch.Tensor.type

    def cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    proxy = _TorchOnCpu("torch")
    proxy.tensor = _cpu_device(torch.tensor)
    proxy.zeros = _cpu_device(torch.zeros)
    _STATE["type"] = original_type
    torch.Tensor.type = cuda_type_name
    for module in (optimizer, clip_grads, utils):
        _STATE[module.__name__] = module.torch
        module.torch = proxy
    return True
