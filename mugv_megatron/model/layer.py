"""One MUG-DiT transformer layer (docs/reference.md §1.4), assembled from a layer spec.

    (sh1, sc1, g1, sh2, sc2, g2) = per-token timestep projection + scale_shift_table
    x = x + g1 · (self_attention(LN(x)·(1+sc1) + sh1) + proj bias)
    x = x + cross_attention(LN_affine(x), text) + proj bias
    x = x + g2 · (mlp(LN(x)·(1+sc2) + sh2) + fc2 bias)

The modulation is chosen per token between the projection of the real timestep (generated
frames) and that of t = 0 (conditioning frames, start and end tokens). Table addition and
modulation are computed in at least float32 (docs/reference.md §3.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from mugv_megatron.model import recompute
from mugv_megatron.model.embedders import ScaleShiftTable

MODULATION_ROWS = 6


@dataclass
class MUGDiTLayerSubmodules:
    input_layernorm: ModuleSpec | type = None
    self_attention: ModuleSpec | type = None
    pre_cross_attn_layernorm: ModuleSpec | type = None
    cross_attention: ModuleSpec | type = None
    pre_mlp_layernorm: ModuleSpec | type = None
    mlp: ModuleSpec | type = None


@dataclass
class LayerInputs:
    """Per-forward tensors shared by every layer (computed once by the model)."""

    # Timestep projections [B, 6·C]: of the real timestep, and of t = 0.
    modulation_t: torch.Tensor
    modulation_t0: torch.Tensor
    # [S_local, B, 1] True where the token is modulated with the real timestep.
    noisy: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    # [B, 1, 1, S] key mask for self-attention (True = padding), None when nothing is padded.
    self_key_padding: torch.Tensor | None
    # Text [L, B, C] and its key mask [B, 1, 1, L].
    context: torch.Tensor
    context_padding: torch.Tensor


class MUGDiTLayer(MegatronModule):
    def __init__(self, config, submodules: MUGDiTLayerSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        self.layer_number = layer_number
        c = config.hidden_size
        # Declared first, as in the reference: parameter order = order of use.
        self.scale_shift_table = ScaleShiftTable(MODULATION_ROWS, c, config.params_dtype, config.sequence_parallel)
        self.input_layernorm = build_module(
            submodules.input_layernorm, config=config, hidden_size=c, eps=config.layernorm_epsilon
        )
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.pre_cross_attn_layernorm = build_module(
            submodules.pre_cross_attn_layernorm, config=config, hidden_size=c, eps=config.layernorm_epsilon
        )
        self.cross_attention = build_module(submodules.cross_attention, config=config, layer_number=layer_number)
        self.pre_mlp_layernorm = build_module(
            submodules.pre_mlp_layernorm, config=config, hidden_size=c, eps=config.layernorm_epsilon
        )
        self.mlp = build_module(
            submodules.mlp,
            config=config,
            ffn_hidden_size=config.ffn_hidden_size,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )

    def _modulation(self, inputs: LayerInputs) -> list[torch.Tensor]:
        table = self.scale_shift_table.bias.float()
        b = inputs.modulation_t.shape[0]
        with_t = inputs.modulation_t.float().view(b, MODULATION_ROWS, -1) + table
        with_t0 = inputs.modulation_t0.float().view(b, MODULATION_ROWS, -1) + table
        per_token = torch.where(inputs.noisy.unsqueeze(-1), with_t, with_t0)  # [S, B, 6, C]
        return list(per_token.unbind(2))

    @staticmethod
    def _modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (normed.float() * (1 + scale) + shift).to(normed.dtype)

    @staticmethod
    def _gated(
        residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        branch = out if bias is None else out + bias
        return residual + (gate * branch.float()).to(residual.dtype)

    def forward(self, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self._modulation(inputs)

        h = self._modulate(self.input_layernorm(hidden), shift1, scale1)
        out, bias = self.self_attention(h, inputs.rope_cos, inputs.rope_sin, inputs.self_key_padding)
        hidden = self._gated(hidden, gate1, out, bias)

        out, bias = self.cross_attention(self.pre_cross_attn_layernorm(hidden), inputs.context, inputs.context_padding)
        hidden = hidden + (out if bias is None else out + bias)

        h = self._modulate(self.pre_mlp_layernorm(hidden), shift2, scale2)
        out, bias = self.mlp(h)
        return self._gated(hidden, gate2, out, bias)


def stage_layers(config) -> tuple[int, int]:
    """(first global layer index, layer count) of this pipeline stage, by megatron's own rules."""
    if config.pipeline_model_parallel_size == 1:
        return 0, config.num_layers
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(config), get_num_layers_to_build(config)


class MUGDiTBlock(MegatronModule):
    """The stack of layers; named `decoder` in the model so parameters read decoder.layers.{i}.

    Under pipeline parallelism a stage holds global layers [layer_offset, layer_offset +
    num_layers); its state dict numbers them from 0, as megatron's blocks do. Both default to
    megatron's split of `config.num_layers` for this pipeline rank.
    """

    def __init__(
        self, config, layer_spec: ModuleSpec, *, num_layers: int | None = None, layer_offset: int | None = None
    ):
        super().__init__(config=config)
        default_offset, default_count = stage_layers(config)
        self.layer_offset = default_offset if layer_offset is None else layer_offset
        count = default_count if num_layers is None else num_layers
        if count < 1 or self.layer_offset < 0 or self.layer_offset + count > config.num_layers:
            raise ValueError(
                f"layers [{self.layer_offset}, {self.layer_offset + count}) are not "
                f"within the model's {config.num_layers} layers"
            )
        self.layers = torch.nn.ModuleList(
            [build_module(layer_spec, config=config, layer_number=self.layer_offset + i + 1) for i in range(count)]
        )

    def forward(self, hidden: torch.Tensor, inputs: LayerInputs, on_layer_output=None):
        """`on_layer_output(i, hidden)` is called after each layer with its global index i.
        Under config recompute "full" each layer is re-run in backward (mugv_megatron.model.recompute)."""
        for i, layer in enumerate(self.layers):
            hidden = recompute.layer_forward(self.config, layer, hidden, inputs)
            if on_layer_output is not None:
                on_layer_output(self.layer_offset + i, hidden)
        return hidden
