"""One definition of model FLOPs and MFU, shared by the JAX and Megatron trainers.

Model FLOPs count the matmuls of the forward pass (2·m·n·k each) from the actual step geometry —
video tokens incl. start/end, text tokens, bidirectional self-attention over all tokens — and a
training step is 3× forward (backward = 2× forward); a LoRA step computes no weight gradients of
its frozen base (`lora_step_flops`). Recompute is not counted: MFU is model
FLOPs over time. Hardware FLOPs (`hardware_step_flops`, for HFU) add the matmuls that the
recompute policy runs a second time in backward, with one table for both trainers' policies:
JAX's remat policies (`mugv_jax/dit/model.py`) and Megatron's recompute modes
(`mugv_megatron/model/recompute.py`). Element-wise work (norms, softmax, RoPE, modulation) is
ignored, as is customary.
"""

from __future__ import annotations

import dataclasses

from mugv.config import DiTConfig
from mugv.lora import LoraConfig

# bf16 dense peak per device, FLOP/s (H100, v5p, v6e: docs/reference.md §8).
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
    forward: float  # one forward pass over the whole global batch
    train: float  # forward + backward (3× forward)

    def per_device(self, num_devices: int) -> float:
        return self.train / num_devices


def layer_parts(config: DiTConfig, num_video_tokens: int, num_text_tokens: int) -> dict[str, float]:
    """Forward matmul FLOPs of one layer for one sample, by the parts recompute policies name:
    the fused qkv projection, the self- and cross-attention scores and values (the batched
    activation × activation matmuls), and the other weight matmuls."""
    c, f = config.hidden_size, config.mlp_hidden_size
    n = num_video_tokens + 2
    l = num_text_tokens
    return {
        "qkv": float(2 * n * c * 3 * c),
        "self_attention": float(2 * 2 * n * n * c),  # q·kᵀ and attn·v over all heads
        "cross_attention": float(2 * 2 * n * l * c),
        "linear_rest": float(
            2 * n * c * c  # self-attn output projection
            + 2 * n * c * c  # cross-attn q
            + 2 * l * c * 2 * c  # cross-attn kv on text
            + 2 * n * c * c  # cross-attn output projection
            + 2 * 2 * n * c * f  # MLP fc1 + fc2
        ),
    }


def _layer_flops(config: DiTConfig, num_video_tokens: int, num_text_tokens: int) -> float:
    return sum(layer_parts(config, num_video_tokens, num_text_tokens).values())


def forward_flops_per_sample(config: DiTConfig, num_video_tokens: int, num_text_tokens: int) -> float:
    c, l = config.hidden_size, num_text_tokens
    per_layer = _layer_flops(config, num_video_tokens, num_text_tokens)
    patch_in = config.in_channels * config.patch_volume
    patch_out = config.out_channels * config.patch_volume
    outside = (
        2 * num_video_tokens * patch_in * c  # patch embed
        + 2 * num_video_tokens * c * patch_out  # final linear
        + 2 * l * (config.text_dim * c + c * c)  # caption embedder
        + 3 * 2 * (config.frequency_dim * c + c * c)  # t, t=0 and fps embedders
        + 2 * 2 * c * 6 * c  # t_block for t and t=0
    )
    return float(config.depth * per_layer + outside)


def step_flops(config: DiTConfig, batch_size: int, num_video_tokens: int, num_text_tokens: int) -> StepFlops:
    fwd = batch_size * forward_flops_per_sample(config, num_video_tokens, num_text_tokens)
    return StepFlops(forward=fwd, train=3.0 * fwd)


def lora_layer_flops(config: DiTConfig, num_video_tokens: int, num_text_tokens: int, lora: LoraConfig) -> float:
    """Forward matmul FLOPs of one layer's LoRA adapters for one sample: x·A and (x·A)·B of every
    adapted linear (the cross-attention kv on the caption tokens, the others on every token)."""
    n, l = num_video_tokens + 2, num_text_tokens
    per_token = lambda s: 2 * lora.rank * (s.shape_in(config) + s.shape_out(config))
    return float(sum((l if s.release == "cross_attn.kv_linear" else n) * per_token(s) for s in lora.sites()))


def lora_step_flops(
    config: DiTConfig, batch_size: int, num_video_tokens: int, num_text_tokens: int, lora: LoraConfig
) -> StepFlops:
    """Model FLOPs of a LoRA step: the frozen base needs no weight gradients, so its backward is
    the input gradients alone (1× the weight matmuls, 2× the attention matmuls, 1× the embedders
    and final layer: an upper bound, the caption and patch embedders need none), and the adapters
    train like any weight (3× their forward)."""
    layer = layer_parts(config, num_video_tokens, num_text_tokens)
    base = forward_flops_per_sample(config, num_video_tokens, num_text_tokens)
    adapters = config.depth * lora_layer_flops(config, num_video_tokens, num_text_tokens, lora)
    attn = layer["self_attention"] + layer["cross_attention"]
    backward = base + config.depth * attn  # every matmul once more, the attention's twice
    return StepFlops(forward=batch_size * (base + adapters), train=batch_size * (base + backward + 3 * adapters))


# What each recompute policy runs twice (parts of `layer_parts`). Keeping every matmul output
# (JAX "dots") recomputes only element-wise work; keeping the weight matmuls but not the batched
# ones (JAX "dots_no_batch" / "offload_dots", whose batch-dimension dots are the attention scores
# and values; Megatron "selective", which re-runs the core attention) recomputes the attention
# matmuls; "full" re-runs each layer's whole forward (embedders and final layer, outside the
# remat'd blocks, are never recomputed); the named save-lists (mugv_jax/dit/model.py) re-run the
# layer but for what they keep: the qkv projection, and with attn_out the self-attention kernel
# (its output and log-sum-exp are kept).
_ATTENTION = frozenset({"self_attention", "cross_attention"})
_LAYER = frozenset({"qkv", "linear_rest"}) | _ATTENTION
RECOMPUTE_PARTS = {
    "none": frozenset(),
    "dots": frozenset(),
    "dots_no_batch": _ATTENTION,
    "offload_dots": _ATTENTION,
    "selective": _ATTENTION,
    "full": _LAYER,
    "save_qkv_proj": _LAYER - {"qkv"},
    "offload_qkv_proj": _LAYER - {"qkv"},
    "save_attn_out": _LAYER - {"self_attention"},
    "offload_attn_out": _LAYER - {"self_attention"},
    "save_qkv_attn": _LAYER - {"qkv", "self_attention"},
}


def recompute_parts(policy: str) -> frozenset:
    """The `layer_parts` that `policy` (a JAX remat policy or a Megatron recompute mode) re-runs."""
    if policy not in RECOMPUTE_PARTS:
        raise ValueError(f"unknown recompute/remat policy {policy!r}; known: {sorted(RECOMPUTE_PARTS)}")
    return RECOMPUTE_PARTS[policy]


def recompute_flops_per_sample(config: DiTConfig, num_video_tokens: int, num_text_tokens: int, policy: str) -> float:
    """Forward matmul FLOPs that `policy` re-runs during backward, per sample."""
    parts = layer_parts(config, num_video_tokens, num_text_tokens)
    return config.depth * sum(parts[p] for p in recompute_parts(policy))


def hardware_step_flops(
    config: DiTConfig, batch_size: int, num_video_tokens: int, num_text_tokens: int, policy: str
) -> StepFlops:
    """`step_flops` plus what the recompute policy runs again (train only; the forward pass
    itself is the same)."""
    model = step_flops(config, batch_size, num_video_tokens, num_text_tokens)
    extra = batch_size * recompute_flops_per_sample(config, num_video_tokens, num_text_tokens, policy)
    return StepFlops(forward=model.forward, train=model.train + extra)


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
