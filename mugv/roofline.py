"""A roofline of one DiT train step per op class, for the planner's predicted step time.

Each class of work runs at its own rate on the device:
- matmul: the weight matmuls (projections, MLP, embedders, final layer) at MATMUL_EFFICIENCY of
  the bf16 peak;
- attention: the fused kernels' scores and values, forward and backward at their own efficiencies
  of the peak, on the hardware FLOPs of the kernel (head dim 72 padded per kernel and platform,
  `hardware_factor`);
- elementwise: norms, modulation, gates, residual adds, RoPE, GELU and the AdamW/EMA update, as
  bytes through HBM at its bandwidth;
- collectives: the bytes the compiled step moves per device (the planner reads them off the
  program) over the interconnect at the pod's bandwidth: ICI on a TPU slice, NVLink inside an
  8-GPU node and InfiniBand between nodes.
Compute classes add up; collectives overlap with compute (the launch scripts turn on XLA's
latency-hiding scheduler and async collectives), so the prediction is max(compute, collectives),
with the serial sum printed beside it as the bound without overlap.

The efficiencies are assumptions stated here, not fits: large bf16 GEMMs reach about 70% of the
dense peak on H100/H200 (cuBLAS) and on TPU MXUs; flash-attention kernels about 55% forward and
45% backward at head dim 64–128 (FlashAttention-3 paper's cuDNN figures on H100); element-wise
fusions about 80% of HBM bandwidth. bench/roofline_check.py sets the prediction for the one
measured step (docs/benchmarks.md, one H200) beside its measurement.
"""

from __future__ import annotations

import dataclasses

from mugv import flops
from mugv.config import DiTConfig
from mugv.lora import LoraConfig

GB = 1e9
MATMUL_EFFICIENCY = 0.70
ATTENTION_EFFICIENCY = {"fwd": 0.55, "bwd": 0.45}
HBM_EFFICIENCY = 0.80


@dataclasses.dataclass(frozen=True)
class Device:
    platform: str  # "tpu" | "gpu"
    hbm: int  # bytes of HBM
    peak: float  # bf16 dense FLOP/s
    hbm_bandwidth: float  # bytes/s
    link: float  # bytes/s per device per direction inside the fast domain (ICI slice, NVLink node)
    node: int  # devices in the fast domain (0: the whole slice)
    network: float = 0.0  # bytes/s per device per direction between nodes (InfiniBand)


GiB = 1024**3
# Vendor figures: v5p 95 GiB HBM2e at 2.76 TB/s, ICI 4,800 Gbps per chip (600 GB/s, both
# directions); v6e 32 GiB at 1.64 TB/s, ICI 3,584 Gbps (448 GB/s); H100 SXM 80 GiB at 3.35 TB/s,
# H200 141 GiB at 4.8 TB/s, NVLink 4 900 GB/s (both directions) in an 8-GPU node, one 400 Gb/s
# InfiniBand NIC per GPU between nodes.
DEVICES = {
    "tpu-v5p": Device("tpu", 95 * GiB, 459e12, 2.76e12, 300 * GB, 0),
    "tpu-v6e": Device("tpu", 32 * GiB, 918e12, 1.64e12, 224 * GB, 0),
    "tpu-v5e": Device("tpu", 16 * GiB, 197e12, 0.82e12, 200 * GB, 0),
    "h100": Device("gpu", 80 * GiB, 989e12, 3.35e12, 450 * GB, 8, 50 * GB),
    "h200": Device("gpu", 141 * GiB, 989e12, 4.8e12, 450 * GB, 8, 50 * GB),
}

# Element-wise bytes per token per layer in one forward, in units of hidden-size elements
# (f32 residual stream = 4 bytes each, bf16 activations 2): LayerNorm + modulation before
# self-attention (read 4, write 2), q/k RMSNorm + RoPE (read 4, write 4), gated residual add
# (read 4 + 2, write 4), cross-attention LayerNorm (4 + 2) and q RMSNorm (2 + 2), its residual
# add (4 + 2 + 4), LayerNorm + modulation before the MLP (4 + 2), GELU on the 4C hidden (8 + 8),
# the gated residual add (4 + 2 + 4). The backward moves about twice this.
ELEMENTWISE_BYTES_PER_TOKEN = 76
# AdamW + EMA per parameter on each device: read the f32 parameter, gradient, both moments and
# the EMA, write parameter, moments and EMA.
OPTIMIZER_BYTES_PER_PARAM = 4 * 9


TPU_LANES = 128  # TPU vector lanes: the TPU kernels put the head dim on this axis


def hardware_factor(kernel: str, head_dim: int, platform: str) -> float:
    """Hardware attention FLOPs / model attention FLOPs of `kernel` on `platform` ("tpu" | "gpu").

    On a TPU the head dim sits on the 128-lane axis (splash pads it; XLA's MXU passes pad it too):
    128/72 for both matmuls at head dim 72. cuDNN's Hopper kernels take 72 but step the q·kᵀ
    contraction in k-tiles of 16 (72 → 80) while the p·v output width stays 72 (a multiple of 8).
    Other kernels on a GPU (XLA, the chunked stand-in) compute the true width."""
    up = lambda x, m: -(-x // m) * m
    if platform == "tpu":
        return up(head_dim, TPU_LANES) / head_dim
    if kernel == "cudnn":
        return (up(head_dim, 16) + up(head_dim, 8)) / (2 * head_dim)
    return 1.0


@dataclasses.dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one optimizer step on one device."""

    matmul_flops: float  # weight matmuls, forward + backward + recompute
    attention_fwd_flops: float  # hardware FLOPs of the attention kernels' forwards (recompute included)
    attention_bwd_flops: float
    elementwise_bytes: float
    collective_seconds: float = 0.0  # from the compiled program and the interconnect


@dataclasses.dataclass(frozen=True)
class Prediction:
    matmul: float  # seconds per class
    attention: float
    elementwise: float
    collectives: float
    model_flops: float  # per device, for MFU

    @property
    def compute(self) -> float:
        return self.matmul + self.attention + self.elementwise

    @property
    def seconds(self) -> float:
        return max(self.compute, self.collectives)

    @property
    def serial_seconds(self) -> float:
        return self.compute + self.collectives

    def mfu(self, peak: float) -> float:
        return self.model_flops / (self.seconds * peak)


def step_cost(
    config: DiTConfig,
    samples: float,
    video_tokens: int,
    text: int,
    remat: str,
    hardware_factor: float,
    params: float,
    tensor: int = 1,
    lora: LoraConfig | None = None,
) -> StepCost:
    """FLOPs and bytes of one step on one device of a pod that splits the work evenly: `samples`
    = global batch / devices, `params` trained parameters held by the device (they take the
    optimizer's traffic). Element-wise work on the residual stream is not split by tensor
    parallelism (the stream is replicated over `tensor`). Under `lora` (on) the base weights are
    frozen: their backward is the input gradients alone (once, not twice, the weight matmuls;
    `flops.lora_step_flops`), and the adapters' matmuls run forward, backward and recompute."""
    layer = flops.layer_parts(config, video_tokens, text)
    recompute = flops.recompute_parts(remat)
    attn = layer["self_attention"] + layer["cross_attention"]
    linear = layer["qkv"] + layer["linear_rest"]
    re_attn = sum(layer[p] for p in ("self_attention", "cross_attention") if p in recompute)
    re_linear = sum(layer[p] for p in ("qkv", "linear_rest") if p in recompute)
    depth = config.depth
    per_token = ELEMENTWISE_BYTES_PER_TOKEN * config.hidden_size
    # forward, a backward of about twice its traffic, and the forward again under any remat
    passes = 3 + bool(recompute)
    elementwise = depth * samples * tensor * (video_tokens + 2) * per_token * passes
    # embedders and the final layer run outside the blocks (never recomputed)
    outside = flops.forward_flops_per_sample(config, video_tokens, text) - depth * sum(layer.values())
    if lora is not None and lora.on:
        adapters = flops.lora_layer_flops(config, video_tokens, text, lora)
        matmul = depth * (2 * linear + re_linear + (3 + bool(recompute)) * adapters) + 2 * outside
    else:
        matmul = depth * (3 * linear + re_linear) + 3 * outside
    return StepCost(
        matmul_flops=samples * matmul,
        attention_fwd_flops=depth * samples * (attn + re_attn) * hardware_factor,
        attention_bwd_flops=depth * samples * 2 * attn * hardware_factor,
        elementwise_bytes=elementwise + params * OPTIMIZER_BYTES_PER_PARAM,
    )


def predict(cost: StepCost, device: Device, model_flops: float) -> Prediction:
    """Seconds per op class for one step on `device`; `model_flops` per device for MFU."""
    return Prediction(
        matmul=cost.matmul_flops / (device.peak * MATMUL_EFFICIENCY),
        attention=cost.attention_fwd_flops / (device.peak * ATTENTION_EFFICIENCY["fwd"])
        + cost.attention_bwd_flops / (device.peak * ATTENTION_EFFICIENCY["bwd"]),
        elementwise=cost.elementwise_bytes / (device.hbm_bandwidth * HBM_EFFICIENCY),
        collectives=cost.collective_seconds,
        model_flops=model_flops,
    )
