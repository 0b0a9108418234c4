"""Activation recompute for the MUG-DiT layer stack: trade backward compute for activation memory.

Modes (`config.megatron.recompute`):
  * "none": every activation of the forward is kept for backward.
  * "full": each layer keeps only its input; backward re-runs the whole layer first (what the
    reference trainer launches with: granularity full, method uniform, one layer per unit).
  * "selective": each core attention (self and cross: scores, softmax, weighted values) keeps
    only its q/k/v and is re-run in backward; everything else is kept. It pays off with the
    unfused local attention, whose [S, S] probabilities dominate memory; a fused kernel
    (Transformer Engine, cuDNN) already keeps no such matrix.

The mode is recorded in megatron's own TransformerConfig fields (recompute_granularity /
recompute_method / recompute_num_layers / recompute_modules), which our layer stack reads, and is
implemented with torch's non-reentrant checkpoint: our layer takes its shared inputs as a
dataclass of tensors (timestep modulation, RoPE, text) whose gradients must flow through the
re-run, which megatron's reentrant `tensor_parallel.checkpoint` would only give to positional
tensor arguments. The model has no dropout, so the re-run is bit-identical to the forward.

FLOPs: `mugv.flops.hardware_step_flops` counts what each mode re-runs (model FLOPs and MFU never
include recompute).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

MODES = ("none", "full", "selective")
_WRAPPED = "_mugv_recompute_wrapped"


def check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"config.megatron.recompute must be one of {list(MODES)}, got {mode!r}")
    return mode


def configure(tc, mode: str) -> None:
    """Write `mode` into a TransformerConfig the way megatron's validation expects it."""
    check(mode)
    if mode == "none":
        tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers = None, None, None
    elif mode == "full":
        tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers = "full", "uniform", 1
    else:
        tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers = "selective", None, None
        tc.recompute_modules = ["core_attn"]


def mode_of(tc) -> str:
    granularity = getattr(tc, "recompute_granularity", None)
    return "none" if granularity is None else granularity


def checkpoint(fn, *args):
    """fn(*args) keeping only its inputs; re-run in backward."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def layer_forward(config, layer, hidden, inputs):
    """One layer of the stack, recomputed in backward under "full"."""
    if mode_of(config) == "full" and torch.is_grad_enabled():
        return checkpoint(layer, hidden, inputs)
    return layer(hidden, inputs)


def _recompute_in_backward(module: torch.nn.Module) -> None:
    if getattr(module, _WRAPPED, False):
        return
    forward = module.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    # An instance attribute: the module (and its state-dict names) stays what the spec built.
    module.forward = checkpointed
    setattr(module, _WRAPPED, True)


def apply(model, mode: str) -> None:
    """Set `mode` on a built MUG-DiT (or pipeline stage). "full" is read by the block at each
    forward; "selective" wraps every layer's core attentions once (a later mode change does not
    unwrap them: build a new model instead)."""
    configure(model.config, mode)
    if mode != "selective":
        return
    for layer in model.decoder.layers:
        for attention in (layer.self_attention, layer.cross_attention):
            _recompute_in_backward(attention.core_attention)
