"""One definition of model FLOPs and MFU, shared by the JAX and Megatron trainers.

Model FLOPs count the matmuls of the forward pass (2·m·n·k each) from the actual step geometry —
video tokens incl. start/end, text tokens, bidirectional self-attention over all tokens — and a
training step is 3× forward (backward = 2× forward). Recompute is not counted (that is hardware
FLOPs, reported separately by the trainers from their remat policy). Element-wise work (norms,
softmax, RoPE, modulation) is ignored, as is customary.
"""
from __future__ import annotations

import dataclasses

from mugv.config import DiTConfig

# bf16 dense peak per device, FLOP/s (DESIGN.md, Performance).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "tpu v5p": 459e12,
    "tpu v6e": 918e12,
    "tpu v5e": 197e12,
    "tpu v4": 275e12,
}


@dataclasses.dataclass(frozen=True)
class StepFlops:
    forward: float          # one forward pass over the whole global batch
    train: float            # forward + backward (3× forward)

    def per_device(self, num_devices: int) -> float:
        return self.train / num_devices


def forward_flops_per_sample(config: DiTConfig, num_video_tokens: int, num_text_tokens: int) -> float:
    c, f = config.hidden_size, config.mlp_hidden_size
    n = num_video_tokens + 2
    l = num_text_tokens
    per_layer = (
        2 * n * c * 3 * c            # fused qkv
        + 2 * 2 * n * n * c          # q·kᵀ and attn·v over all heads
        + 2 * n * c * c              # self-attn output projection
        + 2 * n * c * c              # cross-attn q
        + 2 * l * c * 2 * c          # cross-attn kv on text
        + 2 * 2 * n * l * c          # cross-attn scores and values
        + 2 * n * c * c              # cross-attn output projection
        + 2 * 2 * n * c * f          # MLP fc1 + fc2
    )
    patch_in = config.in_channels * config.patch_volume
    patch_out = config.out_channels * config.patch_volume
    outside = (
        2 * num_video_tokens * patch_in * c                     # patch embed
        + 2 * num_video_tokens * c * patch_out                  # final linear
        + 2 * l * (config.text_dim * c + c * c)                 # caption embedder
        + 3 * 2 * (config.frequency_dim * c + c * c)            # t, t=0 and fps embedders
        + 2 * 2 * c * 6 * c                                     # t_block for t and t=0
    )
    return float(config.depth * per_layer + outside)


def step_flops(config: DiTConfig, batch_size: int, num_video_tokens: int, num_text_tokens: int) -> StepFlops:
    fwd = batch_size * forward_flops_per_sample(config, num_video_tokens, num_text_tokens)
    return StepFlops(forward=fwd, train=3.0 * fwd)


def peak_flops_for(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s for a device kind string (jax `device_kind`, torch device name)."""
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind or key.replace("tpu ", "tpu") in kind.replace(" ", ""):
            return PEAK_FLOPS[key]
    return None


def mfu(train_flops: float, step_seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
    if not peak_per_device or step_seconds <= 0:
        return None
    return train_flops / (step_seconds * num_devices * peak_per_device)


# How much of the forward each activation-recompute setting runs again in the backward pass, as
# matmul FLOPs: "full" reruns the whole block; policies that keep every matmul output (JAX "dots",
# "offload_dots") rerun only element-wise work, which model FLOPs ignore; those that keep only
# non-batched matmuls (JAX "dots_no_batch") or Megatron's "selective" rerun the attention core
# (q·kᵀ and attn·v, batched over heads). One table for both trainers.
RECOMPUTE = {
    "none": "none", "dots": "none", "offload_dots": "none",
    "full": "full",
    "selective": "attention", "dots_no_batch": "attention",
}


def attention_core_flops_per_sample(config: DiTConfig, num_video_tokens: int, num_text_tokens: int) -> float:
    n, c, l = num_video_tokens + 2, config.hidden_size, num_text_tokens
    return float(config.depth * (2 * 2 * n * n * c + 2 * 2 * n * l * c))


def hardware_step_flops(config: DiTConfig, batch_size: int, num_video_tokens: int, num_text_tokens: int,
                        recompute: str = "none") -> float:
    """FLOPs a step actually executes: model FLOPs plus what `recompute` runs again."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute/remat setting {recompute!r}; known: {sorted(RECOMPUTE)}")
    model = step_flops(config, batch_size, num_video_tokens, num_text_tokens)
    kind = RECOMPUTE[recompute]
    if kind == "full":
        return model.train + model.forward
    if kind == "attention":
        return model.train + batch_size * attention_core_flops_per_sample(config, num_video_tokens, num_text_tokens)
    return model.train
