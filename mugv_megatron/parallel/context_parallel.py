"""Context parallelism for the MUG-DiT: the token sequence split over megatron's CP group.

Layout. The sequence [start, video tokens (t, h, w), end] is zero-padded at its end to a
multiple of CP (× TP under sequence parallelism) and cut into CP contiguous, equal chunks; CP
rank r holds tokens [r·S/CP, (r+1)·S/CP). Self-attention has no causal mask, so every chunk
costs the same and no zig-zag reordering is needed. Sequence parallelism then splits each CP
chunk over the TP ranks, exactly as without CP.

Self-attention. Queries stay local; keys and values (after q/k norm and RoPE, which use each
token's own position) are all-gathered over the CP group, so every query attends to all S
tokens, and the padded keys are masked with the same global key mask as without CP. The
backward of the all-gather is a reduce-scatter: each rank receives the summed key/value grads
of its own tokens from every rank's queries. This is Megatron's "all_gather" CP flavour (the
Llama-3 one), chosen over a ring because it is exact with any key-padding mask, runs on gloo,
and costs one all-gather of K and V per layer, small next to the MLP for video sequences. TE's
CP attention is not used even on GPU (its core attention is given a CP = 1 config).

Cross-attention runs per chunk (local queries, replicated text). The final layer runs per
chunk; the output is gathered over CP, and the gather's backward hands each rank only its own
chunk's output grad.

Gradients. Every rank computes the same loss on the gathered output, while each rank's
parameter grads cover only its own tokens: the full grad is the SUM over the CP group. Megatron
gets exactly that: its schedule multiplies the loss by the CP size and its DDP averages over the
data-parallel-with-CP group (dp × cp). `mugv_megatron.parallel.pipeline_parallel.forward_backward` does both; a
caller running its own backward must scale the loss by the CP size before megatron's DDP
reduction (`finalize_model_grads`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


def group():
    return parallel_state.get_context_parallel_group()


def size() -> int:
    return parallel_state.get_context_parallel_world_size()


def rank() -> int:
    return parallel_state.get_context_parallel_rank()


def shard_bounds(total: int) -> tuple[int, int]:
    """[lo, hi) of this CP rank's chunk of a sequence of `total` (a multiple of the CP size)."""
    cp = size()
    if total % cp:
        raise ValueError(f"sequence of {total} tokens does not split over {cp} context-parallel ranks")
    chunk = total // cp
    r = rank()
    return r * chunk, (r + 1) * chunk


def local_chunk(x: torch.Tensor) -> torch.Tensor:
    """This rank's chunk along dim 0 (plain slicing: its backward puts zeros elsewhere)."""
    if size() == 1:
        return x
    lo, hi = shard_bounds(x.shape[0])
    return x[lo:hi]


def gather_keys_values(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 over CP; backward reduce-scatters (sums every rank's grad)."""
    if size() == 1:
        return x
    return tensor_parallel.gather_from_sequence_parallel_region(
        x.contiguous(), tensor_parallel_output_grad=True, group=group()
    )


def gather_output(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 over CP; backward keeps this rank's chunk of the grad.

    Every CP rank computes the same loss from the gathered tensor, so the grad it receives for
    its own chunk is already the whole grad of those tokens.
    """
    if size() == 1:
        return x
    return tensor_parallel.gather_from_sequence_parallel_region(
        x.contiguous(), tensor_parallel_output_grad=False, group=group()
    )
