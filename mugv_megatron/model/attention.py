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
the (normed, rotated) keys and values over the CP group (`mugv_megatron.parallel.context_parallel`), and
the core attention is built with a CP = 1 config because it then sees an ordinary attention of
local queries against all keys.

Masks reach the core attention in the form Transformer Engine's fused kernels take
(`padding_mask_arguments`): mask type `padding` with a (query padding, key padding) pair of
boolean [B, 1, 1, S] tensors, True = padding, valid tokens first. TE reads a padding mask as
sequence lengths (it counts the unmasked positions); an `arbitrary` mask would switch its flash
and fused attention off and materialise the [B, h, Sq, Sk] scores. Both core attentions are of
TE's cross-attention type, because that is the type that takes the pair, and self-attention under
context parallelism is a cross-attention in shape (local queries, gathered keys). Queries are
never marked as padding: the padded positions' outputs are computed like any other and dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import divide

from mugv_megatron.model.rope import apply_rope
from mugv_megatron.model.transformer_config import without_context_parallel, without_sequence_parallel
from mugv_megatron.parallel import context_parallel


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type = None
    q_layernorm: ModuleSpec | type = None
    k_layernorm: ModuleSpec | type = None
    core_attention: ModuleSpec | type = None
    linear_proj: ModuleSpec | type = None


@dataclass
class CrossAttentionSubmodules:
    linear_q: ModuleSpec | type = None
    linear_kv: ModuleSpec | type = None
    q_layernorm: ModuleSpec | type = None
    k_layernorm: ModuleSpec | type = None
    core_attention: ModuleSpec | type = None
    linear_proj: ModuleSpec | type = None


# TE's attention type of every core attention here: the one whose padding mask is a pair.
CORE_ATTENTION_TYPE = "cross"


def trailing_padding(batch: int, padded: int, length: int, device=None) -> torch.Tensor | None:
    """[B, 1, 1, padded] key padding (True = padding) of a sequence of `length` tokens padded to
    `padded`; None when nothing is padded."""
    if padded == length:
        return None
    pad = (torch.arange(padded, device=device) >= length).view(1, 1, 1, -1)
    return pad.expand(batch, -1, -1, -1)


def padding_mask_arguments(queries: int, key_padding: torch.Tensor | None):
    """(attention_mask, attn_mask_type) for the core attention of `queries` local queries.

    key_padding: [B, 1, 1, Sk] bool, True = padding, valid keys first (the model's trailing
    sequence padding, or the caption mask, which the model puts valid-first).
    """
    if key_padding is None:
        return None, AttnMaskType.no_mask
    b = key_padding.shape[0]
    query_padding = torch.zeros(b, 1, 1, queries, dtype=torch.bool, device=key_padding.device)
    return (query_padding, key_padding.to(torch.bool)), AttnMaskType.padding


def _key_padding_of(attention_mask):
    """The key half of a (query, key) padding pair (the query half is never set here)."""
    if isinstance(attention_mask, (tuple, list)):
        return attention_mask[1]
    return attention_mask


class LocalDotProductAttention(DotProductAttention):
    """megatron.core's unfused DotProductAttention, called with TE's (query, key) padding pair:
    the [B, 1, 1, Sk] key half broadcasts over the queries in its masked fill."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        return super().forward(
            query, key, value, _key_padding_of(attention_mask), attn_mask_type=attn_mask_type, **kwargs
        )


class SDPAttention(MegatronModule):
    """Core attention through torch's scaled_dot_product_attention (flash, memory-efficient or
    cuDNN kernels on CUDA: O(S) memory, where megatron's local DotProductAttention materialises
    the scores), with megatron's core-attention interface: [S, B, h, d] in, [S, B, h·d] out."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **kwargs,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SDPAttention has no attention dropout (got {dropout})")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes neither attention_bias nor packed sequences")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, h, S, d]
        key_padding = _key_padding_of(attention_mask)
        keep = None if key_padding is None else ~key_padding  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


class _AttentionBase(MegatronModule):
    def __init__(self, config, submodules, layer_number: int, attention_type: str):
        super().__init__(config=config)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = self.tp_group.size()
        self.head_dim = config.kv_channels
        self.heads_per_rank = divide(config.num_attention_heads, tp)
        self.q_layernorm = build_module(
            submodules.q_layernorm, config=config, hidden_size=self.head_dim, eps=config.layernorm_epsilon
        )
        self.k_layernorm = build_module(
            submodules.k_layernorm, config=config, hidden_size=self.head_dim, eps=config.layernorm_epsilon
        )
        # TE's cross type for both (see the module docstring); `attention_type` names the layer.
        self.attention_type = attention_type
        self.core_attention = build_module(
            submodules.core_attention,
            config=without_context_parallel(config),
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask,
            attention_type=CORE_ATTENTION_TYPE,
            softmax_scale=1.0 / math.sqrt(self.head_dim),
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )

    def _attend(self, q, k, v, key_padding):
        mask, mask_type = padding_mask_arguments(q.shape[0], key_padding)
        context = self.core_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, attn_mask_type=mask_type)
        return self.linear_proj(context)


class SelfAttention(_AttentionBase):
    """Fused QKV (rows grouped per head, [q_h | k_h | v_h]) → q/k RMSNorm → 3D RoPE → attend."""

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int):
        super().__init__(config, submodules, layer_number, "self")
        self.linear_qkv = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            3 * config.num_attention_heads * self.head_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=True,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        key_padding: torch.Tensor | None = None,
    ):
        """hidden [S_local, B, C] → (output [S_local, B, C], output bias [C]).

        rope_cos/rope_sin cover this rank's context-parallel chunk (all of it under sequence
        parallelism, whose column-parallel projection gathers the chunk); key_padding [B, 1, 1,
        S_total] indexes the whole sequence.
        """
        qkv, _ = self.linear_qkv(hidden)  # [S_cp, B, 3·C/tp]
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
            submodules.linear_q,
            config.hidden_size,
            width,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=True,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="q",
            tp_group=self.tp_group,
        )
        self.linear_kv = build_module(
            submodules.linear_kv,
            config.hidden_size,
            2 * width,
            config=without_sequence_parallel(config),
            init_method=config.init_method,
            gather_output=False,
            bias=True,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="kv",
            tp_group=self.tp_group,
        )

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, context_padding: torch.Tensor | None):
        """hidden [S_local, B, C], context [L, B, C] (replicated) → (output, output bias)."""
        q, _ = self.linear_q(hidden)  # [S, B, C/tp]
        s, b = q.shape[:2]
        q = q.view(s, b, self.heads_per_rank, self.head_dim)
        kv, _ = self.linear_kv(context)  # [L, B, 2·C/tp]
        k, v = kv.view(kv.shape[0], b, self.heads_per_rank, 2, self.head_dim).unbind(3)
        return self._attend(self.q_layernorm(q), self.k_layernorm(k), v, context_padding)
