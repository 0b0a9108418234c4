"""The three norms of the MUG-DiT, as the release computes them.

Spec-built modules take `(config, hidden_size, eps)`, like megatron's norm modules. megatron's
own `WrappedTorchNorm` refuses sequence parallelism, and its RMSNorm multiplies by the weight
before casting back rather than after, so these small modules are used instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerNormNoAffine(torch.nn.Module):
    """Parameter-free LayerNorm (adaLN norms, final-layer norm, caption-embedder norms)."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps)


class LayerNormAffine(torch.nn.Module):
    """LayerNorm with weight and bias (`pre_cross_attn_layernorm`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        # Applied to sequence-split tokens: megatron's finalize_model_grads sums these grads
        # over the tensor-parallel group when the attribute is set.
        for p in (self.weight, self.bias):
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class HeadRMSNorm(torch.nn.Module):
    """Per-head RMSNorm of q and k: normalise in float32, cast back, then scale by the weight.

    The weight is shared by all heads and so replicated over tensor-parallel ranks; its name
    (`q_layernorm`/`k_layernorm`) is what megatron's finalize_model_grads keys its TP grad
    all-reduce on.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight
