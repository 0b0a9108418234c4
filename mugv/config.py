"""The MUG-DiT model description: a frozen dataclass and the released size presets.

Sizes follow the reference (docs/reference.md §1.1): every preset has 56 layers, head dim 72, MLP ratio 4,
24 latent channels in and 48 out (channels 24..47 are an unused "learned sigma" leftover), patch
(1, 2, 2) and T5-XXL text features of width 4096. `tiny` is the configuration of the golden
vectors (tests/golden/dit_tiny) and is what the tests run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# The 3D RoPE splits each head into three equal parts (h, w, t) of rotation pairs.
ROPE_AXES = 3


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    depth: int = 56
    hidden_size: int = 3456
    num_heads: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 24
    out_channels: int = 48
    text_dim: int = 4096
    mlp_ratio: float = 4.0
    # Longest caption in tokens (T5, padding="max_length"); the null caption for classifier-free
    # guidance has this many rows.
    max_text_tokens: int = 300
    # Width of the sinusoidal timestep / fps features.
    frequency_dim: int = 256
    rope_theta: float = 10000.0
    # Rows of the precomputed RoPE tables: 384 patches per side, 480 latent frames.
    rope_space_positions: int = 384
    rope_time_positions: int = 480
    norm_eps: float = 1e-6
    # The release's text embedder uses 1e-6; the reference Megatron trainer ends up with 1e-5.
    caption_norm_eps: float = 1e-6
    # The release rounds the timestep to bfloat16 before embedding it; off by default (docs/reference.md §3.4).
    round_timestep_to_bf16: bool = False

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"DiTConfig.depth must be >= 1, got {self.depth}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % (2 * ROPE_AXES):
            raise ValueError(
                f"head dim {self.head_dim} (hidden_size/num_heads) must be divisible by 6 for the "
                f"3D RoPE (h, w, t rotation pairs)"
            )
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise ValueError(f"DiTConfig.patch_size must be three positive ints, got {self.patch_size}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def rope_pairs_per_axis(self) -> int:
        return self.head_dim // (2 * ROPE_AXES)

    def replace(self, **changes) -> DiTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> DiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiTConfig fields: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, DiTConfig] = {
    "1b": DiTConfig(hidden_size=1152, num_heads=16),
    "4b": DiTConfig(hidden_size=2304, num_heads=32),
    "10b": DiTConfig(hidden_size=3456, num_heads=48),
    "18b": DiTConfig(hidden_size=4608, num_heads=64),
    "debug": DiTConfig(hidden_size=288, num_heads=4),
    # The golden-vector configuration: head dim 72 like the real model, tiny everything else.
    "tiny": DiTConfig(depth=2, hidden_size=144, num_heads=2, text_dim=64, max_text_tokens=16),
}


def get_config(name_or_config: str | DiTConfig, **overrides) -> DiTConfig:
    """A preset by name (or a config passed through), with field overrides applied."""
    if isinstance(name_or_config, DiTConfig):
        cfg = name_or_config
    else:
        try:
            cfg = PRESETS[name_or_config]
        except KeyError:
            raise ValueError(f"unknown model preset {name_or_config!r}; choose one of {sorted(PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
