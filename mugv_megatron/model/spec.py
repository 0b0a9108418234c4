"""Layer specs: which implementation fills each submodule of a MUG-DiT layer.

The local spec uses megatron.core's own ColumnParallelLinear / RowParallelLinear / MLP and one of
two core attentions, both running anywhere, CPU included:
- "megatron": megatron.core's unfused DotProductAttention (the reference the parity tests use;
  it materialises the [B, h, Sq, Sk] scores, so it does not fit 720p clips);
- "sdpa": torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA), the
  local spec for real GPU runs without Transformer Engine.
The Transformer Engine spec swaps in TE's linears and fused attention; it is only offered when
`transformer_engine` imports and CUDA is present, and gets padding masks it runs fused
(mugv_megatron/model/attention.py). It has not been run here (no GPU, no TE on the development
machines); bench/device_check.py runs it where TE imports.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from mugv_megatron.model.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    LocalDotProductAttention,
    SDPAttention,
    SelfAttention,
    SelfAttentionSubmodules,
)
from mugv_megatron.model.layer import MUGDiTLayer, MUGDiTLayerSubmodules
from mugv_megatron.model.norms import HeadRMSNorm, LayerNormAffine, LayerNormNoAffine


def _layer_spec(column, row, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=MUGDiTLayer,
        submodules=MUGDiTLayerSubmodules(
            input_layernorm=LayerNormNoAffine,
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    q_layernorm=HeadRMSNorm,
                    k_layernorm=HeadRMSNorm,
                    core_attention=core_attention,
                    linear_proj=row,
                ),
            ),
            pre_cross_attn_layernorm=LayerNormAffine,
            cross_attention=ModuleSpec(
                module=CrossAttention,
                submodules=CrossAttentionSubmodules(
                    linear_q=column,
                    linear_kv=column,
                    q_layernorm=HeadRMSNorm,
                    k_layernorm=HeadRMSNorm,
                    core_attention=core_attention,
                    linear_proj=row,
                ),
            ),
            pre_mlp_layernorm=LayerNormNoAffine,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


LOCAL_ATTENTION = {"megatron": LocalDotProductAttention, "sdpa": SDPAttention}


def get_local_layer_spec(attention: str = "megatron") -> ModuleSpec:
    if attention not in LOCAL_ATTENTION:
        raise ValueError(f"unknown local core attention {attention!r}; choose from {sorted(LOCAL_ATTENTION)}")
    return _layer_spec(ColumnParallelLinear, RowParallelLinear, LOCAL_ATTENTION[attention])


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def get_te_layer_spec() -> ModuleSpec:
    """Transformer Engine linears and fused attention (needs a GPU with TE)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TERowParallelLinear,
    )

    return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention)


def get_layer_spec(use_te: bool | None = None, local_attention: str = "megatron") -> ModuleSpec:
    """TE spec when asked for (or, with None, when available); otherwise the local spec with
    `local_attention` as its core attention."""
    if use_te is None:
        use_te = transformer_engine_available()
    return get_te_layer_spec() if use_te else get_local_layer_spec(local_attention)
