"""A plain-torch MUG-DiT: the release architecture in eager PyTorch, as the CPU speed reference.

Written for this project from the release schema (parameter names and shapes, `mugv.schema`) and
the model description in docs/reference.md; its `state_dict()` is a release state dict, so the
same weights load into it, the JAX model and the Megatron model. It is not the trainer's model:
bench/cpu_vs_torch.py times the JAX and Megatron models against it, and
tests/bench/test_torch_reference.py holds it to the golden vectors (float32).

Attention: `attention="sdpa"` uses torch's fused CPU kernel (`scaled_dot_product_attention`),
`"math"` the explicit softmax(q·kᵀ)·v.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mugv.config import DiTConfig


def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rope(x, cos, sin):
    """Rotate adjacent pairs (2j, 2j+1) of x [B, H, N, D] by angles [B, 1, N, D/2]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)


def attend(q, k, v, mask, kind: str):
    """q [B,H,Nq,D], k/v [B,H,Nk,D], mask [B,Nk] bool or None → [B,H,Nq,D]; a sample with no
    valid key gets zeros."""
    if kind == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    else:
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = s.softmax(-1) @ v
    if mask is not None:
        out = torch.where(mask.any(-1)[:, None, None, None], out.nan_to_num(), torch.zeros_like(out))
    return out


class SelfAttention(nn.Module):
    def __init__(self, c: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 3 * c)
        self.q_norm = RMSNorm(c // heads, eps)
        self.k_norm = RMSNorm(c // heads, eps)
        self.proj = nn.Linear(c, c)

    def forward(self, x, cos, sin, kind):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rope(self.q_norm(q), cos, sin), rope(self.k_norm(k), cos, sin)
        return self.proj(attend(q, k, v, None, kind).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, c: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(c, c)
        self.kv_linear = nn.Linear(c, 2 * c)
        self.q_norm = RMSNorm(c // heads, eps)
        self.k_norm = RMSNorm(c // heads, eps)
        self.proj = nn.Linear(c, c)

    def forward(self, x, text, mask, kind):
        b, n, c = x.shape
        q = self.q_norm(self.q_linear(x).view(b, n, self.heads, -1)).transpose(1, 2)
        k, v = self.kv_linear(text).view(b, text.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = attend(q, self.k_norm(k), v, mask, kind)
        return self.proj(a.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, c: int, hidden: int, c_out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c_out or c)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        c = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)
        self.attn = SelfAttention(c, cfg.num_heads, cfg.norm_eps)
        self.cross_attn_norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.cross_attn = CrossAttention(c, cfg.num_heads, cfg.norm_eps)
        self.mlp = Mlp(c, cfg.mlp_hidden_size)

    def forward(self, x, mod, text, text_mask, cos, sin, kind):
        # mod [B, N, 6, C]: the per-token AdaLN-single rows before the block's own table.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod + self.scale_shift_table).unbind(2)
        c = x.shape[-1]
        h = modulate(F.layer_norm(x, (c,), eps=self.eps), shift_msa, scale_msa)
        x = x + gate_msa * self.attn(h, cos, sin, kind)
        x = x + self.cross_attn(self.cross_attn_norm(x), text, text_mask, kind)
        h = modulate(F.layer_norm(x, (c,), eps=self.eps), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(h)


class Embedder(nn.Module):
    def __init__(self, freq: int, c: int):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, c), nn.SiLU(), nn.Linear(c, c))

    def forward(self, t):
        return self.mlp(sinusoid(t, self.freq))


class CaptionEmbedder(nn.Module):
    def __init__(self, text_dim: int, c: int, eps: float):
        super().__init__()
        self.eps = eps
        self.y_proj = Mlp(text_dim, c, c)

    def forward(self, y):
        y = F.layer_norm(y, y.shape[-1:], eps=self.eps)
        y = self.y_proj(y)
        return F.layer_norm(y, y.shape[-1:], eps=self.eps)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        c = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.randn(2, c) / c**0.5)
        self.linear = nn.Linear(c, cfg.patch_volume * cfg.out_channels)


class TorchDiT(nn.Module):
    """Called like the release model: (x, timestep, y, mask, x_mask, fps, frame_indice)."""

    def __init__(self, cfg: DiTConfig, attention: str = "sdpa"):
        super().__init__()
        if attention not in ("sdpa", "math"):
            raise ValueError(f"attention must be 'sdpa' or 'math', got {attention!r}")
        c = cfg.hidden_size
        self.cfg, self.attention = cfg, attention
        self.start_token = nn.Parameter(torch.randn(c) * 0.02)
        self.end_token = nn.Parameter(torch.randn(c) * 0.02)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(cfg.in_channels, c, cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = Embedder(cfg.frequency_dim, c)
        self.fps_embedder = Embedder(cfg.frequency_dim, c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg.text_dim, c, cfg.caption_norm_eps)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        d = cfg.head_dim
        exponents = torch.arange(0, d, 6, dtype=torch.float32)[: cfg.rope_pairs_per_axis] / d
        self.register_buffer("rope_freqs", 1.0 / cfg.rope_theta**exponents, persistent=False)

    def _rope(self, frame_indice, grid):
        """cos/sin [B, 1, N+2, D/2] of the (h, w, t) positions of [start, video tokens, end]."""
        cfg = self.cfg
        gt, gh, gw = grid
        b = frame_indice.shape[0]
        fi = frame_indice.long()
        t = fi[:, 1 : gt + 1, None, None].expand(b, gt, gh, gw)
        h = torch.arange(gh)[None, None, :, None].expand(b, gt, gh, gw)
        w = torch.arange(gw)[None, None, None, :].expand(b, gt, gh, gw)
        video = torch.stack([h, w, t], -1).reshape(b, -1, 3)
        zero = torch.zeros_like(fi[:, 0])
        start = torch.stack([zero, zero, fi[:, 0]], -1)[:, None]
        end = torch.stack([zero + gh - 1, zero + gw - 1, fi[:, gt + 1]], -1)[:, None]
        pos = torch.cat([start, video, end], 1)
        limit = torch.tensor([cfg.rope_space_positions - 1] * 2 + [cfg.rope_time_positions - 1])
        pos = torch.minimum(pos.clamp(min=0), limit)
        ang = (pos.float()[..., None] * self.rope_freqs).reshape(b, pos.shape[1], -1)[:, None]
        return torch.cos(ang), torch.sin(ang)

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, frame_indice=None):
        cfg = self.cfg
        b, _, t, hh, ww = x.shape
        pt, ph, pw = cfg.patch_size
        gt, gh, gw = -(-t // pt), -(-hh // ph), -(-ww // pw)
        c = cfg.hidden_size
        fps = fps.float().reshape(-1).expand(b)
        fps_emb = self.fps_embedder(fps)
        cond_t = self.t_embedder(timestep.float()) + fps_emb
        cond_0 = self.t_embedder(torch.zeros_like(timestep, dtype=torch.float32)) + fps_emb
        mod_t, mod_0 = self.t_block(cond_t).view(b, 6, c), self.t_block(cond_0).view(b, 6, c)

        text = self.y_embedder(y[:, 0])
        text_mask = None if mask is None else mask.bool()

        xp = F.pad(x.float(), (0, gw * pw - ww, 0, gh * ph - hh, 0, gt * pt - t))
        tokens = self.x_embedder.proj(xp).flatten(2).transpose(1, 2)
        n = tokens.shape[1]
        start, end = self.start_token.expand(b, 1, c), self.end_token.expand(b, 1, c)
        h = torch.cat([start, tokens, end], 1)

        frames = torch.ones(b, t, dtype=torch.bool) if x_mask is None else x_mask.bool()
        frames = F.pad(frames, (0, gt * pt - t))[:, ::pt]
        video = frames[:, :, None].expand(b, gt, gh * gw).reshape(b, n)
        token_mask = F.pad(video, (1, 1))
        mod = torch.where(token_mask[:, :, None, None], mod_t[:, None], mod_0[:, None])

        if frame_indice is None:
            frame_indice = torch.arange(gt + 2)[None]
        cos, sin = self._rope(frame_indice.expand(b, gt + 2), (gt, gh, gw))
        for block in self.blocks:
            h = block(h, mod, text, text_mask, cos, sin, self.attention)

        fl = self.final_layer
        cond = torch.where(video[:, :, None], cond_t[:, None], cond_0[:, None])
        shift, scale = cond + fl.scale_shift_table[0], cond + fl.scale_shift_table[1]
        out = fl.linear(modulate(F.layer_norm(h[:, 1 : 1 + n], (c,), eps=cfg.norm_eps), shift, scale))
        co = cfg.out_channels
        out = out.view(b, gt, gh, gw, pt, ph, pw, co).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, co, gt * pt, gh * ph, gw * pw)[:, :, :t, :hh, :ww]
