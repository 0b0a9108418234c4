"""DiTConfig → megatron.core TransformerConfig for the MUG-DiT layer stack."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from mugv.config import DiTConfig

# Reference trainer initialisation (docs/reference.md §1.8): --init-method-std 0.014.
INIT_METHOD_STD = 0.014

gelu_tanh = functools.partial(F.gelu, approximate="tanh")


def _parallel_state_size(getter_name: str) -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return getattr(parallel_state, getter_name)()


def make_transformer_config(
    config: DiTConfig,
    *,
    tensor_parallel_size: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    perform_initialization: bool = True,
    context_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
):
    """The megatron config of the layer stack.

    Context- and pipeline-parallel sizes default to megatron's parallel state (1 when it is not
    initialised), so that a model built after `parallel.setup(..., context_parallel_size=2)`
    is a context-parallel model without every caller passing the sizes.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if context_parallel_size is None:
        context_parallel_size = _parallel_state_size("get_context_parallel_world_size")
    if pipeline_parallel_size is None:
        pipeline_parallel_size = _parallel_state_size("get_pipeline_model_parallel_world_size")
    if config.depth % pipeline_parallel_size:
        raise ValueError(
            f"DiTConfig.depth {config.depth} is not divisible by the pipeline-parallel size {pipeline_parallel_size}"
        )
    on_gpu = torch.cuda.is_available()
    tc = TransformerConfig(
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
        context_parallel_size=context_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        # Stages exchange [S_local, B, C] activations; S depends on each clip's latent size.
        pipeline_dtype=params_dtype,
        variable_seq_lengths=True,
        # No experts; megatron rejects variable_seq_lengths with the default "allgather"
        # dispatcher whether or not MoE is used.
        moe_token_dispatcher_type="alltoall",
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=perform_initialization,
        init_method_std=INIT_METHOD_STD,
        # Output projections scaled by depth, as Megatron's default scaled init does.
        output_layer_init_method=_normal_init(INIT_METHOD_STD / math.sqrt(2.0 * config.depth)),
    )
    # Every pipeline stage holds the conditioning embedders (their parameters are flagged
    # `pipeline_parallel`); this tells megatron's finalize_model_grads to sum their grads
    # over the pipeline group. Not a TransformerConfig field, read with getattr by megatron.
    tc.has_cond_embedder = pipeline_parallel_size > 1
    return tc


def without_sequence_parallel(tc):
    """The same config with sequence parallelism off, for linears fed with replicated inputs."""
    if not tc.sequence_parallel:
        return tc
    return dataclasses.replace(tc, sequence_parallel=False)


def without_context_parallel(tc):
    """The same config with context parallelism off, for the core attention: the layer gathers
    the keys/values over the context-parallel group itself, so the kernel sees a plain
    (queries-local, keys-global) attention. megatron's local DotProductAttention refuses CP>1."""
    if tc.context_parallel_size == 1:
        return tc
    return dataclasses.replace(tc, context_parallel_size=1)


def _normal_init(std: float):
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_
