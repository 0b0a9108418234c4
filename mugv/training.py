"""Run-config sections both trainers read the same way (framework-free, so the JAX and Megatron
trainers cannot drift apart): `config.optim`, `config.objective`, `config.preference` and
`config.megatron` as validated frozen dataclasses holding their defaults, and the resolution rule
of the timestep shift. The whole run config, built from them once, is mugv/run/config.py."""

from __future__ import annotations

import dataclasses

from mugv.geometry import SPATIAL_DOWNSAMPLE

BASE_RESOLUTION = 512 * 512


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 100
    schedule: str = "constant"  # "constant" | "cosine"
    decay_steps: int = 0  # cosine: steps after warmup to reach final_lr_ratio
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    ema_decay: float = 0.9999
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"--config.optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.schedule == "cosine" and self.decay_steps <= 0:
            raise ValueError("--config.optim.decay_steps must be > 0 for the cosine schedule")
        if self.grad_accum_steps < 1:
            raise ValueError(f"--config.optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    # Frame count used in the shift; None = the batch's real latent frame count.
    shift_num_frames: int | None = None
    # A fixed shift ratio instead of the resolution/length rule (None = the rule). Toy resolutions
    # give r < 1, which trains almost only near-clean timesteps; the tiny configs use 1.0.
    shift_ratio: float | None = None
    # Probability per sample that its first frames become conditioning frames (image-to-video).
    i2v_prob: float = 0.0
    # "first": one conditioning frame; "quarter": uniformly 1..max(1, T//4) frames.
    i2v_mode: str = "first"
    # Probability per sample that the whole caption is replaced by the null text features.
    caption_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.i2v_mode not in ("first", "quarter"):
            raise ValueError(f"--config.objective.i2v_mode must be 'first' or 'quarter', got {self.i2v_mode!r}")
        for name in ("i2v_prob", "caption_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"--config.objective.{name} must be in [0, 1], got {p}")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """`config.preference`: the labelled data of a `mode="preference"` run and its loss."""

    labels: str = ""  # label JSONL (mugv.data.preference)
    heldout_labels: str = ""  # held-out label JSONL ("" = no held-out evaluation)
    clips: str = ""  # the clips' directory ("" = <dir of labels>/clips)
    batch_size: int = 8  # global batch of pairs (DPO) or labelled clips (KTO)
    heldout_batches: int = 2
    heldout_seed: int = 99
    eval_every: int = 20
    beta_dpo: float = 200.0
    beta_kto: float = 200.0
    sft_weight: float = 0.1
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    # Timesteps t = sigmoid(u)·1000 (logit-normal) shifted by this ratio (None = resolution rule).
    shift_ratio: float | None = None


def shift_ratio(latent_shape: tuple[int, int, int], shift_num_frames: int | None = None) -> float:
    """The timestep-shift ratio of docs/reference.md §2.1: sqrt(pixels / 512²) · sqrt(latent frames)."""
    frames, h, w = latent_shape
    f = shift_num_frames if shift_num_frames is not None else frames
    return float(((h * SPATIAL_DOWNSAMPLE) * (w * SPATIAL_DOWNSAMPLE) / BASE_RESOLUTION) ** 0.5 * f**0.5)


@dataclasses.dataclass(frozen=True)
class MegatronOptions:
    """`config.megatron`: how the Megatron backend runs (the JAX backend's counterparts are
    `mesh`, `attention` and `remat`; each backend ignores the other's execution settings)."""

    tp: int = 1  # tensor-parallel size
    sp: bool = False  # sequence parallel (needs tp > 1)
    pp: int = 1  # pipeline-parallel size (must divide the depth)
    cp: int = 1  # context-parallel size
    distributed_optimizer: bool = True  # megatron's DistributedOptimizer (torch AdamW without CUDA)
    use_te: bool | None = None  # Transformer Engine layers; None = when it imports
    # Core attention of the local (non-TE) spec: "sdpa" (torch scaled_dot_product_attention, fused
    # kernels on GPU: what fits 720p without TE) or "megatron" (megatron's unfused attention).
    local_attention: str = "sdpa"
    # Parameter dtype: "float32" (the parameters are the master weights; bf16 compute through
    # autocast) or "bfloat16" (bf16 weights, fp32 main weights in the distributed optimizer, as
    # the reference trains). None: bfloat16 when compute_dtype is bfloat16 and the distributed
    # optimizer runs (GPU), else float32.
    params_dtype: str | None = None
    # Activation recompute: "none", "full" (every layer re-run in backward: the reference's
    # setting, least memory) or "selective" (the attention cores re-run). Counted in the hardware
    # FLOPs, not the model FLOPs (mugv/flops.py), like the JAX backend's `remat`.
    recompute: str = "none"
    # Distributed optimizer only: reduce-scatter gradient buckets while backward still runs, and
    # all-gather updated parameter buckets during the next forward.
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    # Checkpoints written by a forked writer while training continues; published (renamed, named
    # in the tracker) once every rank's writer is done.
    async_save: bool = True
    # Samples per data-parallel rank in one micro-batch; gradient accumulation is then the global
    # batch / (data parallel × micro_batch_size), whatever the world size. None: the accumulation
    # is optim.grad_accum_steps (shared with the JAX backend, whose data parallelism differs).
    micro_batch_size: int | None = None

    def __post_init__(self):
        for key in ("tp", "pp", "cp"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"--config.megatron.{key} must be >= 1, got {getattr(self, key)}")
        if self.sp and int(self.tp) < 2:
            raise ValueError("--config.megatron.sp (sequence parallel) needs --config.megatron.tp >= 2")
        if self.local_attention not in ("sdpa", "megatron"):
            raise ValueError(
                f"--config.megatron.local_attention must be 'sdpa' or 'megatron', got {self.local_attention!r}"
            )
        if self.recompute not in ("none", "full", "selective"):
            raise ValueError(
                f"--config.megatron.recompute must be 'none', 'full' or 'selective', got {self.recompute!r}"
            )
        if self.micro_batch_size is not None and int(self.micro_batch_size) < 1:
            raise ValueError(f"--config.megatron.micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if self.params_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(
                f"--config.megatron.params_dtype must be None, 'float32' or 'bfloat16', got {self.params_dtype!r}"
            )
