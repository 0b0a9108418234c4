"""Run-config pieces both trainers read the same way (framework-free, so the JAX and Megatron
trainers cannot drift apart): the `config.optim` and `config.objective` sections as validated
frozen dataclasses, the resolution rule of the timestep shift, and the run's model config."""
from __future__ import annotations

import dataclasses

from mugv.config import DiTConfig, get_config
from mugv.geometry import SPATIAL_DOWNSAMPLE

BASE_RESOLUTION = 512 * 512


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 100
    schedule: str = "constant"      # "constant" | "cosine"
    decay_steps: int = 0            # cosine: steps after warmup to reach final_lr_ratio
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
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.schedule == "cosine" and self.decay_steps <= 0:
            raise ValueError("optim.decay_steps must be > 0 for the cosine schedule")
        if self.grad_accum_steps < 1:
            raise ValueError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


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
            raise ValueError(f"objective.i2v_mode must be 'first' or 'quarter', got {self.i2v_mode!r}")
        for name in ("i2v_prob", "caption_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"objective.{name} must be in [0, 1], got {p}")


def shift_ratio(latent_shape: tuple[int, int, int], shift_num_frames: int | None = None) -> float:
    """The timestep-shift ratio of spec.md §2: sqrt(pixels / 512²) · sqrt(latent frames)."""
    frames, h, w = latent_shape
    f = shift_num_frames if shift_num_frames is not None else frames
    return float(((h * SPATIAL_DOWNSAMPLE) * (w * SPATIAL_DOWNSAMPLE) / BASE_RESOLUTION) ** 0.5 * f ** 0.5)


def model_config_from(config) -> DiTConfig:
    """The DiTConfig of a run config: the `model` preset with `model_overrides` applied."""
    return get_config(config.model, **dict(config.get("model_overrides", {}) or {}))


def dataclass_from(cls, section):
    """`cls(**section)`, refusing fields the dataclass does not have (a typo in a config)."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(section)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields in config: {sorted(unknown)}")
    return cls(**values)


def unflatten(flat: dict[str, object]) -> dict:
    """{"a.b.c": v} → {"a": {"b": {"c": v}}}."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out
