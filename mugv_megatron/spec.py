"""Layer specs: which implementation fills each submodule of a MUG-DiT layer.

The local spec uses megatron.core's own ColumnParallelLinear / RowParallelLinear / MLP /
DotProductAttention and runs anywhere, CPU included. The Transformer Engine spec swaps in TE's
linears and fused attention; it is only offered when `transformer_engine` imports and CUDA is
present. It has not been run here (no GPU, no TE on the development machines).
"""
from __future__ import annotations

import torch

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from mugv_megatron.attention import (CrossAttention, CrossAttentionSubmodules, SelfAttention,
                                     SelfAttentionSubmodules)
from mugv_megatron.layer import MUGDiTLayer, MUGDiTLayerSubmodules
from mugv_megatron.norms import HeadRMSNorm, LayerNormAffine, LayerNormNoAffine


def _layer_spec(column, row, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=MUGDiTLayer,
        submodules=MUGDiTLayerSubmodules(
            input_layernorm=LayerNormNoAffine,
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column, q_layernorm=HeadRMSNorm, k_layernorm=HeadRMSNorm,
                    core_attention=core_attention, linear_proj=row)),
            pre_cross_attn_layernorm=LayerNormAffine,
            cross_attention=ModuleSpec(
                module=CrossAttention,
                submodules=CrossAttentionSubmodules(
                    linear_q=column, linear_kv=column, q_layernorm=HeadRMSNorm,
                    k_layernorm=HeadRMSNorm, core_attention=core_attention, linear_proj=row)),
            pre_mlp_layernorm=LayerNormNoAffine,
            mlp=ModuleSpec(module=MLP,
                           submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def get_local_layer_spec() -> ModuleSpec:
    return _layer_spec(ColumnParallelLinear, RowParallelLinear, DotProductAttention)


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def get_te_layer_spec() -> ModuleSpec:
    """Transformer Engine linears and attention (untested here: needs a GPU with TE)."""
    from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear,
                                                             TEDotProductAttention,
                                                             TERowParallelLinear)
    return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention)


def get_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """TE spec when asked for (or, with None, when available); otherwise the local spec."""
    if use_te is None:
        use_te = transformer_engine_available()
    return get_te_layer_spec() if use_te else get_local_layer_spec()
