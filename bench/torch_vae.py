"""A plain-torch MUG-V video VAE: the release's four networks in eager PyTorch, the CPU speed reference.

Written for this project from the release VAE schema (`mugv.vae_config`, names and shapes) and
the architecture notes in docs/vae.md; `state_dict()` is a release `vae.pt` state dict, so the
same weights load here and into `mugv_jax.vae`. Only the networks are here (channels-first,
[N, C, H, W] and [N, C, T, H, W]):

    encode_frames  frames → 2D mid-block features × scaling_factor
    decode_frames  scaled features → frames
    encode_groups  independent 8-frame groups → temporal moments (quant_conv applied)
    decode_window  one decode window of latents → 8× the frames (uncropped)

`encode`/`decode` chain them for a clip whose frame count is a multiple of 8 and that is decoded
in one window: the shape bench/cpu_vs_torch.py times, where the release orchestration has no
padding or cropping to do. tests/bench/test_torch_reference.py checks them against the golden
vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mugv.vae_config import DECODER_TEMPORAL_UPSAMPLE, TEMPORAL_GROUP, VAEConfig


def _gn(groups, c, eps):
    return nn.GroupNorm(groups, c, eps=eps)


class Resnet2D(nn.Module):
    def __init__(self, cin, cout, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.spatial_norm_eps
        self.norm1, self.conv1 = _gn(g, cin, eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _gn(g, cout, eps), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention2D(nn.Module):
    """One head over the h·w positions of a frame, residual added."""

    def __init__(self, c, cfg: VAEConfig):
        super().__init__()
        self.group_norm = _gn(cfg.norm_num_groups, c, cfg.spatial_norm_eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)
        a = F.scaled_dot_product_attention(self.to_q(t)[:, None], self.to_k(t)[:, None], self.to_v(t)[:, None])
        return x + self.to_out[0](a[:, 0]).transpose(1, 2).reshape(n, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, c, cfg: VAEConfig):
        super().__init__()
        self.attentions = nn.ModuleList([Attention2D(c, cfg)])
        self.resnets = nn.ModuleList([Resnet2D(c, c, cfg), Resnet2D(c, c, cfg)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage2D(nn.Module):
    def __init__(self, cin, cout, n, cfg, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet2D(cin if j == 0 else cout, cout, cfg) for j in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Down(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Up(cout)])
        self.resample = resample

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder2D(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                Stage2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg, "down" if i < last else None)
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], cfg)
        self.conv_norm_out = _gn(cfg.norm_num_groups, ch[-1], cfg.spatial_norm_eps)  # unused by the release
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # unused

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.mid_block(x)


class Decoder2D(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, last = cfg.block_out_channels[::-1], len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)  # unused by the release
        self.up_blocks = nn.ModuleList(
            [
                Stage2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, cfg, "up" if i < last else None)
                for i in range(len(rev))
            ]
        )
        self.mid_block = MidBlock(rev[0], cfg)
        self.conv_norm_out = _gn(cfg.norm_num_groups, rev[-1], cfg.spatial_norm_eps)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, x):
        x = self.mid_block(x)
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class CausalConv3d(nn.Module):
    """Centre-padded in time: (k−1)+(1−stride) zero frames, front = half of them; space k//2."""

    def __init__(self, cin, cout, k, *, bias, stride=1):
        super().__init__()
        tpad = (k - 1) + (1 - stride)
        self.pad = (k // 2, k // 2, k // 2, k // 2, tpad // 2, tpad - tpad // 2)
        self.conv = nn.Conv3d(cin, cout, k, stride=(stride, 1, 1), bias=bias)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class ResBlock3D(nn.Module):
    def __init__(self, cin, cout, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.temporal_num_groups, cfg.temporal_norm_eps
        self.norm1, self.conv1 = _gn(g, cin, eps), CausalConv3d(cin, cout, 3, bias=False)
        self.norm2, self.conv2 = _gn(g, cout, eps), CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def body(self, x):
        return self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))

    def forward(self, x):
        return self.body(x) + (x if self.conv3 is None else self.conv3(x))


class TimeUpsample(ResBlock3D):
    def forward(self, x):
        x = x.repeat_interleave(2, dim=2)
        return self.body(x) + x


def _depth_to_time(x):
    """[N, 2C, T, h, w] → [N, C, 2T, h, w]: channel c·2+k becomes channel c at time 2t+k."""
    n, c2, t, h, w = x.shape
    return x.view(n, c2 // 2, 2, t, h, w).transpose(2, 3).reshape(n, c2 // 2, 2 * t, h, w)


class TemporalEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, n = cfg.temporal_widths, cfg.num_res_blocks
        self.conv_in = CausalConv3d(cfg.temporal_in_out_channels, cfg.filters, 3, bias=False)
        cins = (cfg.filters, *widths[:-1])
        self.block_res_blocks = nn.ModuleList(
            [
                nn.ModuleList([ResBlock3D(ci if j == 0 else co, co, cfg) for j in range(n)])
                for ci, co in zip(cins, widths)
            ]
        )
        self.conv_blocks = nn.ModuleList([CausalConv3d(c, c, 3, bias=True, stride=2) for c in widths[:-1]])
        self.res_blocks = nn.ModuleList([ResBlock3D(widths[-1], widths[-1], cfg) for _ in range(n)])
        self.norm1 = _gn(cfg.temporal_num_groups, widths[-1], cfg.temporal_norm_eps)
        self.conv2 = CausalConv3d(widths[-1], 2 * cfg.latent_embed_dim, 1, bias=True)

    def forward(self, x):
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for b in blocks:
                x = b(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for b in self.res_blocks:
            x = b(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, n = cfg.temporal_widths, cfg.num_res_blocks
        top = widths[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, top, 3, bias=True)
        self.res_blocks = nn.ModuleList([ResBlock3D(top, top, cfg) for _ in range(n)])
        self.upsample_block = TimeUpsample(top, top, cfg)
        cins = (*widths[1:], top)
        self.block_res_blocks = nn.ModuleList(
            [
                nn.ModuleList([ResBlock3D(ci if j == 0 else co, co, cfg) for j in range(n)])
                for ci, co in zip(cins, widths)
            ]
        )
        self.conv_blocks = nn.ModuleList(
            [
                CausalConv3d(widths[i + 1], 2 * widths[i + 1], 3, bias=True) if up else nn.Identity()
                for i, up in enumerate(DECODER_TEMPORAL_UPSAMPLE)
            ]
        )
        self.norm1 = _gn(cfg.temporal_num_groups, widths[0], cfg.temporal_norm_eps)
        self.conv_out = CausalConv3d(widths[0], cfg.temporal_in_out_channels, 3, bias=True)

    def forward(self, z):
        x = self.upsample_block(self._res(self.conv1(z), self.res_blocks))
        for i in reversed(range(len(self.block_res_blocks))):
            x = self._res(x, self.block_res_blocks[i])
            if i > 0 and DECODER_TEMPORAL_UPSAMPLE[i - 1]:
                x = _depth_to_time(self.conv_blocks[i - 1](x))
        return self.conv_out(F.silu(self.norm1(x)))

    @staticmethod
    def _res(x, blocks):
        for b in blocks:
            x = b(x)
        return x


class TorchVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial_vae = nn.Module()
        self.spatial_vae.module = nn.Module()
        self.spatial_vae.module.encoder = Encoder2D(cfg)
        self.spatial_vae.module.decoder = Decoder2D(cfg)
        self.temporal_vae = nn.Module()
        self.temporal_vae.encoder = TemporalEncoder(cfg)
        self.temporal_vae.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1, bias=True)
        self.temporal_vae.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1, bias=True)
        self.temporal_vae.decoder = TemporalDecoder(cfg)
        self.register_buffer("shift", torch.zeros(1, cfg.embed_dim, 1, 1, 1))
        self.register_buffer("scale", torch.ones(1, cfg.embed_dim, 1, 1, 1))
        self.logvar = nn.Parameter(torch.full((), 4.0))

    # --- the four networks (channels-first) ---

    def encode_frames(self, frames):
        return self.spatial_vae.module.encoder(frames) * self.cfg.scaling_factor

    def decode_frames(self, features):
        return self.spatial_vae.module.decoder(features / self.cfg.scaling_factor)

    def encode_groups(self, groups):
        return self.temporal_vae.quant_conv(self.temporal_vae.encoder(groups))[:, :, 0]

    def decode_window(self, z):
        return self.temporal_vae.decoder(self.temporal_vae.post_quant_conv(z))

    # --- a clip of 8k frames, one frame per 2D call (the release's micro_batch_size bounds memory
    # the same way), every 8-frame group encoded at once, decoded in one window ---

    def encode(self, x):
        """Video [B, 3, T, H, W], T a multiple of 8 → normalised posterior mode [B, E, T/8, h, w]."""
        b, _, t = x.shape[:3]
        if t % TEMPORAL_GROUP:
            raise ValueError(f"TorchVAE.encode takes a multiple of {TEMPORAL_GROUP} frames, got {t}")
        frames = x.transpose(1, 2).flatten(0, 1)
        feats = torch.cat([self.encode_frames(f[None]) for f in frames])  # [B·T, C, h, w]
        c, h, w = feats.shape[1:]
        groups = feats.view(b * t // TEMPORAL_GROUP, TEMPORAL_GROUP, c, h, w).transpose(1, 2)
        moments = self.encode_groups(groups).view(b, t // TEMPORAL_GROUP, -1, h, w).transpose(1, 2)
        return (moments[:, : self.cfg.embed_dim] - self.shift) / self.scale

    def decode(self, z):
        """Normalised latents [B, E, L, h, w] → video [B, 3, 8L, 8h, 8w] (one window)."""
        b = z.shape[0]
        feats = self.decode_window(z * self.scale + self.shift)  # [B, C, 8L, h, w]
        frames = feats.transpose(1, 2).flatten(0, 1)
        video = torch.cat([self.decode_frames(f[None]) for f in frames])
        return video.view(b, -1, *video.shape[1:]).transpose(1, 2)
