"""DiTConfig → megatron.core TransformerConfig for the MUG-DiT layer stack."""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from mugv.config import DiTConfig

# Reference trainer initialisation (megatron-trainer.md §1.9): --init-method-std 0.014.
INIT_METHOD_STD = 0.014

gelu_tanh = functools.partial(F.gelu, approximate="tanh")


def make_transformer_config(config: DiTConfig, *, tensor_parallel_size: int = 1,
                            sequence_parallel: bool = False,
                            params_dtype: torch.dtype = torch.float32,
                            perform_initialization: bool = True):
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=config.depth,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_query_groups=config.num_heads,
        kv_channels=config.head_dim,
        ffn_hidden_size=config.mlp_hidden_size,
        layernorm_epsilon=config.norm_eps,
        # Names the q/k norm kind; the adaLN LayerNorms are not taken from this field.
        normalization="RMSNorm",
        qk_layernorm=True,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        # The reference uses fused kernels for these; the unfused paths compute the same
        # functions and are the only ones that run on CPU.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        rotary_interleaved=True,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=perform_initialization,
        init_method_std=INIT_METHOD_STD,
        # Output projections scaled by depth, as Megatron's default scaled init does.
        output_layer_init_method=_normal_init(INIT_METHOD_STD / math.sqrt(2.0 * config.depth)),
    )


def without_sequence_parallel(tc):
    """The same config with sequence parallelism off, for linears fed with replicated inputs."""
    if not tc.sequence_parallel:
        return tc
    return dataclasses.replace(tc, sequence_parallel=False)


def _normal_init(std: float):
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_
