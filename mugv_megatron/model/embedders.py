"""The modules outside the transformer layers: patch, timestep, fps and text embedders, final layer.

They are small and replicated on every tensor-parallel rank, so they are plain torch modules.
Attribute names give the Megatron parameter names of docs/reference.md §4.6
(`timestep_embedder.mlp.0.weight`, `context_embedder.proj.fc1.weight`, …).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mugv.config import DiTConfig
from mugv_megatron.model.norms import LayerNormNoAffine

SINUSOID_MAX_PERIOD = 10000.0


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = SINUSOID_MAX_PERIOD) -> torch.Tensor:
    """[cos(t·f_k), sin(t·f_k)] with f_k = max_period^(-k/half), in float64; t used raw."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t.to(torch.float64).reshape(-1, 1) * freqs.to(t.device)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class SinusoidEmbedder(torch.nn.Module):
    """sinusoid(frequency_dim) → Linear → SiLU → Linear, for timesteps and fps."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype):
        super().__init__()
        self.frequency_dim = config.frequency_dim
        c = config.hidden_size
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(config.frequency_dim, c, dtype=dtype),
            torch.nn.SiLU(),
            torch.nn.Linear(c, c, dtype=dtype),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class CaptionMlp(torch.nn.Module):
    def __init__(self, config: DiTConfig, dtype: torch.dtype):
        super().__init__()
        self.fc1 = torch.nn.Linear(config.text_dim, config.hidden_size, dtype=dtype)
        self.fc2 = torch.nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(torch.nn.Module):
    """Per-token text projection: LN (no affine), fc1, GELU-tanh, fc2, LN (no affine)."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype):
        super().__init__()
        self.pre_norm = LayerNormNoAffine(eps=config.caption_norm_eps)
        self.proj = CaptionMlp(config, dtype)
        self.post_norm = LayerNormNoAffine(eps=config.caption_norm_eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.post_norm(self.proj(self.pre_norm(y)))


class PatchEmbed3D(torch.nn.Module):
    """Conv3d with kernel = stride = patch; zero-pads T/H/W up to a patch multiple first."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = torch.nn.Conv3d(
            config.in_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, T, H, W] → [B, C, T', H', W']."""
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        pad = (0, -w % pw, 0, -h % ph, 0, -t % pt)
        if any(pad):
            x = F.pad(x, pad)
        return self.proj(x)


class ScaleShiftTable(torch.nn.Module):
    """A learned [rows, C] table added to the timestep projection; stored as `<name>.bias`."""

    def __init__(self, rows: int, hidden_size: int, dtype: torch.dtype, sequence_parallel: bool = False):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(rows, hidden_size, dtype=dtype) / math.sqrt(hidden_size))
        # Added to sequence-split tokens: its grad is summed over TP by finalize_model_grads.
        self.bias.sequence_parallel = sequence_parallel


class FinalLayer(torch.nn.Module):
    """LN (no affine), modulated by the per-token t-embedding plus a 2-row table, then Linear."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype, sequence_parallel: bool = False):
        super().__init__()
        self.norm_final = LayerNormNoAffine(eps=config.norm_eps)
        self.scale_shift_table = ScaleShiftTable(2, config.hidden_size, dtype, sequence_parallel)
        self.linear = torch.nn.Linear(config.hidden_size, config.patch_volume * config.out_channels, dtype=dtype)
        for p in self.linear.parameters():
            p.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [S, B, C]; emb [S, B, C] (each token's t-embedding) → [S, B, patch·C_out]."""
        table = self.scale_shift_table.bias.float()
        shift = emb.float() + table[0]
        scale = emb.float() + table[1]
        h = (self.norm_final(x).float() * (1 + scale) + shift).to(x.dtype)
        return self.linear(h)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], config: DiTConfig) -> torch.Tensor:
    """[B, T'·H'·W', (pt, ph, pw, C_out)] → [B, C_out, T'·pt, H'·ph, W'·pw]."""
    t, h, w = grid
    pt, ph, pw = config.patch_size
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h, w, pt, ph, pw, config.out_channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, config.out_channels, t * pt, h * ph, w * pw)
