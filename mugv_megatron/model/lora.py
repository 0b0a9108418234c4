"""LoRA adapters on the Megatron DiT (the definition is mugv/lora.py).

Each targeted linear gets `lora_A` and `lora_B` submodules (state-dict names as PEFT gives them,
`decoder.layers.<i>.self_attention.linear_qkv.lora_A.weight`) and a forward hook adding
scale · B(A(x)) to its output. Tensor parallelism follows the reference trainer: a column-parallel
base gets a whole A (torch Linear) and a column-parallel B, a row-parallel base a row-parallel A
and a whole B, so the update lands on the same shard, and in the same sequence layout, as the
base output. Under sequence parallelism the whole factor sees this rank's tokens only, so it is
marked `sequence_parallel` and megatron's tensor-parallel grad all-reduce sums it, as it does for
the layer norms. Adapters are float32; every base parameter stops requiring gradients, so the
optimizer (which takes `requires_grad` parameters) holds no state for them.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from mugv.io.base import to_torch
from mugv.layouts import megatron as layout
from mugv.lora import LoraConfig, adapter_name, init_adapter
from mugv_megatron.parallel import state as parallel


def _zeros(weight):
    torch.nn.init.zeros_(weight)


def _site_module(layer, site):
    suffix = layout.megatron_name(f"blocks.0.{site.release}.weight").removeprefix(layout.layer_name(0, ""))
    return layer.get_submodule(suffix.removesuffix(".weight"))


def _attach(base, site, lora: LoraConfig, config) -> None:
    r, cfg = lora.rank, base.config
    sp = bool(getattr(base, "sequence_parallel", False))
    tc = dataclasses.replace(cfg, sequence_parallel=sp, params_dtype=torch.float32, perform_initialization=False)
    n_in, n_out = site.shape_in(config), site.shape_out(config)
    if site.parallel == "column":
        base.lora_A = torch.nn.Linear(n_in, r, bias=False, dtype=torch.float32)
        base.lora_B = ColumnParallelLinear(
            r, n_out, config=tc, init_method=_zeros, bias=False, gather_output=False, skip_bias_add=True
        )
        replicated = base.lora_A.weight
    else:
        base.lora_A = RowParallelLinear(
            n_in, r, config=tc, init_method=_zeros, bias=False, input_is_parallel=True, skip_bias_add=True
        )
        base.lora_B = torch.nn.Linear(r, n_out, bias=False, dtype=torch.float32)
        replicated = base.lora_B.weight
    with torch.no_grad():  # megatron leaves its weights unset without perform_initialization
        base.lora_A.weight.zero_()
        base.lora_B.weight.zero_()
    replicated.sequence_parallel = sp
    scale = lora.scale

    def add_update(module, args, output):
        low = module.lora_A(args[0])
        low = low[0] if isinstance(low, tuple) else low
        up = module.lora_B(low)
        up = up[0] if isinstance(up, tuple) else up
        y, bias = output
        return y + scale * up.to(y.dtype), bias

    base.register_forward_hook(add_update)


def add_adapters(model, lora: LoraConfig) -> None:
    """Freeze every base parameter of `model` (a megatron MUGDiT stage) and attach the adapters
    of `lora`, holding their starting values (gaussian A, B = 0)."""
    if not lora.on:
        raise ValueError("config.lora.rank is 0: no adapters to add")
    for p in model.parameters():
        p.requires_grad_(False)
    config, block = model.dit_config, model.decoder
    for layer in block.layers:
        for site in lora.sites():
            _attach(_site_module(layer, site), site, lora, config)
    values = {}
    for i in range(block.layer_offset, block.layer_offset + len(block.layers)):
        for site in lora.sites():
            a, b = init_adapter(config, lora, i, site)
            values[adapter_name(i, site, "A")], values[adapter_name(i, site, "B")] = a, b
    load_adapters(model, values)


def _local_name(block, megatron_name: str) -> str:
    """`decoder.layers.<global i>.…` as this pipeline stage names it."""
    layer, suffix = layout.split_layer(megatron_name)
    return layout.layer_name(layer - block.layer_offset, suffix)


def load_adapters(model, state) -> None:
    """Copy release-named adapter tensors of this stage's layers into the model (this TP rank's
    shard; rows of fused projections regrouped per head like their base)."""
    config, block = model.dit_config, model.decoder
    tp, rank = parallel.tensor_parallel_size(), parallel.tensor_parallel_rank()
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            for mname, full in layout.release_to_megatron(name, to_torch(value), config):
                local = _local_name(block, mname)
                if local not in own:
                    raise KeyError(f"adapter {name} ({local}) is not in this model (is LoRA on for its target?)")
                own[local].copy_(layout.tp_shard(mname, full, rank, tp).to(own[local].dtype))


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    """This rank's adapter parameters by (local) Megatron name."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def release_adapters(model) -> dict[str, torch.Tensor]:
    """The model's adapters by release-style name (rows of fused projections ungrouped), for an
    export (mugv/io/peft.py). One tensor-parallel rank holding whole tensors: TP > 1 shards are
    merged by the checkpoint converters, not here."""
    if parallel.tensor_parallel_size() != 1:
        raise ValueError("release_adapters reads whole adapters: run it at TP=1 (convert a TP>1 checkpoint first)")
    block, out = model.decoder, {}
    for name, p in adapter_parameters(model).items():
        layer, suffix = layout.split_layer(name)
        full = layout.layer_name(layer + block.layer_offset, suffix)
        for rname, a in layout.megatron_to_release(full, p.detach().cpu(), model.dit_config):
            out[rname] = a.contiguous()
    return out
