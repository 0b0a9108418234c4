"""Self- and cross-attention of a MUG-DiT layer, built from a spec of megatron.core modules.

Both follow megatron's tensor-parallel pattern: column-parallel input projections (each rank owns
whole heads, thanks to the per-head row grouping of the fused QKV / KV weights), per-head q/k
RMSNorm, a core-attention module on the local heads, and a row-parallel output projection whose
bias is returned unadded so that the layer can put it inside the gate.

Under sequence parallelism the column-parallel projections all-gather the sequence, so attention
always sees every token (start and end tokens included, exactly once) and the row-parallel output
projection reduce-scatters back to the local chunk. Text keys/values are replicated, not
sequence-split, so the KV projection runs with sequence parallelism off.

Under context parallelism each rank holds one chunk of the sequence; self-attention all-gathers
the (normed, rotated) keys and values over the CP group (`mugv_megatron.context_parallel`), and
the core attention is built with a CP = 1 config because it then sees an ordinary attention of
local queries against all keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import divide

from mugv_megatron import context_parallel
from mugv_megatron.rope import apply_rope
from mugv_megatron.transformer_config import without_context_parallel, without_sequence_parallel


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = None
    k_layernorm: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


@dataclass
class CrossAttentionSubmodules:
    linear_q: Union[ModuleSpec, type] = None
    linear_kv: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = None
    k_layernorm: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


def _mask_for(key_padding: Optional[torch.Tensor], queries: int):
    """[B, 1, 1, Sk] key-padding mask (True = ignore) → ([B, 1, Sq, Sk] view, mask type)."""
    if key_padding is None:
        return None, AttnMaskType.no_mask
    return key_padding.expand(-1, -1, queries, -1), AttnMaskType.arbitrary


class _AttentionBase(MegatronModule):
    def __init__(self, config, submodules, layer_number: int, attention_type: str):
        super().__init__(config=config)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = self.tp_group.size()
        self.head_dim = config.kv_channels
        self.heads_per_rank = divide(config.num_attention_heads, tp)
        self.q_layernorm = build_module(submodules.q_layernorm, config=config,
                                        hidden_size=self.head_dim, eps=config.layernorm_epsilon)
        self.k_layernorm = build_module(submodules.k_layernorm, config=config,
                                        hidden_size=self.head_dim, eps=config.layernorm_epsilon)
        self.core_attention = build_module(
            submodules.core_attention, config=without_context_parallel(config),
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask, attention_type=attention_type,
            softmax_scale=1.0 / math.sqrt(self.head_dim))
        self.linear_proj = build_module(
            submodules.linear_proj, config.num_attention_heads * self.head_dim, config.hidden_size,
            config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="proj", tp_group=self.tp_group)

    def _attend(self, q, k, v, key_padding):
        mask, mask_type = _mask_for(key_padding, q.shape[0])
        context = self.core_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask,
                                      attn_mask_type=mask_type)
        return self.linear_proj(context)


class SelfAttention(_AttentionBase):
    """Fused QKV (rows grouped per head, [q_h | k_h | v_h]) → q/k RMSNorm → 3D RoPE → attend."""

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int):
        super().__init__(config, submodules, layer_number, "self")
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size,
            3 * config.num_attention_heads * self.head_dim,
            config=config, init_method=config.init_method, gather_output=False, bias=True,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="qkv",
            tp_group=self.tp_group)

    def forward(self, hidden: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                key_padding: Optional[torch.Tensor] = None):
        """hidden [S_local, B, C] → (output [S_local, B, C], output bias [C]).

        rope_cos/rope_sin cover this rank's context-parallel chunk (all of it under sequence
        parallelism, whose column-parallel projection gathers the chunk); key_padding [B, 1, 1,
        S_total] indexes the whole sequence.
        """
        qkv, _ = self.linear_qkv(hidden)                     # [S_cp, B, 3·C/tp]
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, self.heads_per_rank, 3, self.head_dim).unbind(3)
        q = apply_rope(self.q_layernorm(q), rope_cos, rope_sin)
        k = apply_rope(self.k_layernorm(k), rope_cos, rope_sin)
        k = context_parallel.gather_keys_values(k)
        v = context_parallel.gather_keys_values(v)
        return self._attend(q, k, v, key_padding)


class CrossAttention(_AttentionBase):
    """Queries from the video tokens, keys/values from the text (rows [k_h | v_h]); no RoPE."""

    def __init__(self, config, submodules: CrossAttentionSubmodules, layer_number: int):
        super().__init__(config, submodules, layer_number, "cross")
        width = config.num_attention_heads * self.head_dim
        self.linear_q = build_module(
            submodules.linear_q, config.hidden_size, width, config=config,
            init_method=config.init_method, gather_output=False, bias=True, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="q", tp_group=self.tp_group)
        self.linear_kv = build_module(
            submodules.linear_kv, config.hidden_size, 2 * width,
            config=without_sequence_parallel(config), init_method=config.init_method,
            gather_output=False, bias=True, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="kv", tp_group=self.tp_group)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor,
                context_padding: Optional[torch.Tensor]):
        """hidden [S_local, B, C], context [L, B, C] (replicated) → (output, output bias)."""
        q, _ = self.linear_q(hidden)                          # [S, B, C/tp]
        s, b = q.shape[:2]
        q = q.view(s, b, self.heads_per_rank, self.head_dim)
        kv, _ = self.linear_kv(context)                       # [L, B, 2·C/tp]
        k, v = kv.view(kv.shape[0], b, self.heads_per_rank, 2, self.head_dim).unbind(3)
        return self._attend(self.q_layernorm(q), self.k_layernorm(k), v, context_padding)
