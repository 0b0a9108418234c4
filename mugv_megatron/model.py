"""The MUG-DiT on megatron.core, called with the release model's inputs.

Forward (megatron-trainer.md §1.2, with the release's patch padding and output crop):
  1. Zero-pad x to a patch multiple, patch-embed, flatten (t, h, w) → N tokens.
  2. e_t = t_embedder(t) + fps_embedder(fps), e_0 = t_embedder(0) + fps_embedder(fps);
     m_t, m_0 = timestep_block(e_t), timestep_block(e_0).
  3. Text → caption embedder, per-sample key mask from `mask`.
  4. [start, tokens, end], sequence-first; modulated with m_t on generated frames and m_0 on
     conditioning frames and on the start/end tokens; 3D RoPE from `frame_indice`.
  5. The layers, the final layer (modulated by e_t / e_0 per token), drop start/end,
     unpatchify, crop to the input size.

Sequence parallelism (TP > 1): the whole sequence, start and end tokens included, is padded
with zero tokens to a multiple of the TP size and split evenly; the padding is masked out of
self-attention keys and dropped at the end. Every rank therefore computes exactly the
single-device model: each special token exists once, and cross-attention queries cover every
rank's chunk (the reference gets both wrong, megatron-trainer.md §2.8).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from mugv.config import DiTConfig
from mugv_megatron.embedders import (CaptionEmbedder, FinalLayer, PatchEmbed3D, SinusoidEmbedder,
                                     unpatchify)
from mugv_megatron.layer import LayerInputs, MODULATION_ROWS, MUGDiTBlock
from mugv_megatron.rope import rope_angles, rope_cos_sin

SPECIAL_TOKEN_INIT_STD = 0.02


class MUGDiT(MegatronModule):
    def __init__(self, config: DiTConfig, transformer_config, layer_spec):
        super().__init__(config=transformer_config)
        if config.patch_size[0] != 1:
            raise ValueError(
                f"patch_size {config.patch_size}: x_mask and frame_indice are per latent frame, "
                f"so the temporal patch size must be 1")
        tc = transformer_config
        if tc.num_layers != config.depth:
            raise ValueError(f"transformer config has {tc.num_layers} layers, DiTConfig.depth is "
                             f"{config.depth}")
        self.dit_config = config
        dtype = tc.params_dtype
        c = config.hidden_size
        self.x_embedder = PatchEmbed3D(config, dtype)
        self.start_token = torch.nn.Parameter(torch.randn(c, dtype=dtype) * SPECIAL_TOKEN_INIT_STD)
        self.end_token = torch.nn.Parameter(torch.randn(c, dtype=dtype) * SPECIAL_TOKEN_INIT_STD)
        self.timestep_embedder = SinusoidEmbedder(config, dtype)
        self.fps_embedder = SinusoidEmbedder(config, dtype)
        self.timestep_block = torch.nn.Sequential(
            torch.nn.SiLU(), torch.nn.Linear(c, MODULATION_ROWS * c, dtype=dtype))
        self.context_embedder = CaptionEmbedder(config, dtype)
        self.decoder = MUGDiTBlock(tc, layer_spec)
        self.final_layer = FinalLayer(config, dtype, tc.sequence_parallel)

    # -----------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.start_token.device

    def _check_inputs(self, x, timestep, y, mask, x_mask, fps, frame_indice):
        cfg = self.dit_config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, T, H, W], got {list(x.shape)}")
        b, _, t = x.shape[:3]
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"timestep must be [B] = [{b}], got {list(timestep.shape)}")
        if y.dim() != 4 or y.shape[0] != b or y.shape[1] != 1 or y.shape[3] != cfg.text_dim:
            raise ValueError(
                f"y must be [B, 1, L, {cfg.text_dim}] with B = {b}, got {list(y.shape)}")
        if mask is not None and tuple(mask.shape) != (b, y.shape[2]):
            raise ValueError(f"mask must be [B, L] = [{b}, {y.shape[2]}], got {list(mask.shape)}")
        if x_mask is not None and tuple(x_mask.shape) != (b, t):
            raise ValueError(f"x_mask must be [B, T] = [{b}, {t}], got {list(x_mask.shape)}")
        if fps is None or tuple(fps.shape) != (b,):
            raise ValueError(f"fps must be given as [B] = [{b}], got "
                             f"{None if fps is None else list(fps.shape)}")
        if frame_indice is not None and tuple(frame_indice.shape) != (b, t + 2):
            raise ValueError(f"frame_indice must be [B, T+2] = [{b}, {t + 2}], got "
                             f"{list(frame_indice.shape)}")

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor,
                mask: Optional[torch.Tensor] = None, x_mask: Optional[torch.Tensor] = None,
                fps: Optional[torch.Tensor] = None, frame_indice: Optional[torch.Tensor] = None,
                activations: Optional[dict] = None) -> torch.Tensor:
        """Release-layout call → [B, out_channels, T, H, W] float32.

        x [B, C_in, T, H, W]; timestep [B]; y [B, 1, L, D]; mask [B, L] (1 = valid token);
        x_mask [B, T] (True = generated frame; default all True); fps [B];
        frame_indice [B, T+2] (default 0..T+1). If `activations` is a dict it receives the
        intermediate tensors under the golden-vector names (x_embedder, t_embedder.call0, …).
        """
        self._check_inputs(x, timestep, y, mask, x_mask, fps, frame_indice)
        cfg = self.dit_config
        device, dtype = self._device(), self.config.params_dtype
        b, _, frames, height, width = x.shape

        def capture(name, tensor):
            if activations is not None:
                activations[name] = tensor.detach().float().cpu()

        # 1. Patches.
        patches = self.x_embedder(x.to(device=device, dtype=dtype))
        grid = tuple(patches.shape[2:])
        tokens = patches.flatten(2).transpose(1, 2)                       # [B, N, C]
        capture("x_embedder", tokens)
        n = tokens.shape[1]

        # 2. Timestep / fps conditioning.
        t = timestep.to(device)
        if cfg.round_timestep_to_bf16:
            t = t.to(torch.bfloat16)
        t_emb = self.timestep_embedder(t)
        t0_emb = self.timestep_embedder(torch.zeros_like(t))
        fps_emb = self.fps_embedder(fps.to(device))
        e_t, e_0 = t_emb + fps_emb, t0_emb + fps_emb
        m_t, m_0 = self.timestep_block(e_t), self.timestep_block(e_0)
        for name, value in (("t_embedder.call0", t_emb), ("t_embedder.call1", t0_emb),
                            ("fps_embedder", fps_emb), ("t_block.call0", m_t),
                            ("t_block.call1", m_0)):
            capture(name, value)

        # 3. Text.
        text = self.context_embedder(y[:, 0].to(device=device, dtype=dtype))   # [B, L, C]
        capture("y_embedder", text[:, None])
        valid = (torch.ones(text.shape[:2], dtype=torch.bool) if mask is None
                 else mask.to(torch.bool)).to(device)
        empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"samples {empty} have no valid text token in `mask`")
        context = text.transpose(0, 1)                                            # [L, B, C]
        context_padding = (~valid).view(b, 1, 1, -1)

        # 4. Sequence with start/end tokens, per-token timestep choice, RoPE.
        c = cfg.hidden_size
        seq = torch.cat([self.start_token.view(1, 1, c).expand(b, 1, c), tokens,
                         self.end_token.view(1, 1, c).expand(b, 1, c)], dim=1)
        length = n + 2
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = tp_group.size()
        sp = self.config.sequence_parallel
        padded = -(-length // tp) * tp if sp else length
        hidden = torch.nn.functional.pad(seq, (0, 0, 0, padded - length)).transpose(0, 1)
        hidden = hidden.contiguous()                                              # [S, B, C]

        generated = (torch.ones(b, frames, dtype=torch.bool) if x_mask is None
                     else x_mask.to(torch.bool)).to(device)
        per_video_token = generated.repeat_interleave(n // frames, dim=1)         # [B, N]
        noisy = torch.zeros(padded, b, dtype=torch.bool, device=device)
        noisy[1:length - 1] = per_video_token.t()

        if frame_indice is None:
            frame_indice = torch.arange(frames + 2).expand(b, -1)
        cos, sin = rope_cos_sin(rope_angles(grid, frame_indice.cpu(), cfg, total_tokens=padded),
                                dtype, device)
        self_key_padding = None
        if padded > length:
            self_key_padding = (torch.arange(padded, device=device) >= length).view(1, 1, 1, -1)
            self_key_padding = self_key_padding.expand(b, -1, -1, -1)

        if sp:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=tp_group)
            chunk = padded // tp
            rank = tp_group.rank()
            noisy = noisy[rank * chunk:(rank + 1) * chunk]
            # Replicated conditioning used by local tokens only: sum its grads over the ranks.
            m_t, m_0, e_t, e_0 = (
                tensor_parallel.copy_to_tensor_model_parallel_region(v, group=tp_group)
                for v in (m_t, m_0, e_t, e_0))

        inputs = LayerInputs(modulation_t=m_t, modulation_t0=m_0, noisy=noisy.unsqueeze(-1),
                             rope_cos=cos, rope_sin=sin, self_key_padding=self_key_padding,
                             context=context, context_padding=context_padding)

        def capture_block(i, h):
            if activations is not None:
                full = (tensor_parallel.gather_from_sequence_parallel_region(
                    h, tensor_parallel_output_grad=False, group=tp_group) if sp else h)
                capture(f"blocks.{i}", full[:length].transpose(0, 1))

        hidden = self.decoder(hidden, inputs, on_layer_output=capture_block)

        # 5. Final layer, back to video.
        emb = torch.where(noisy.unsqueeze(-1), e_t.unsqueeze(0), e_0.unsqueeze(0))
        out = self.final_layer(hidden, emb)
        if sp:
            out = tensor_parallel.gather_from_sequence_parallel_region(
                out, tensor_parallel_output_grad=False, group=tp_group)
        out = out[1:length - 1].transpose(0, 1)                                   # [B, N, P·C]
        capture("final_layer", out)
        video = unpatchify(out, grid, cfg)
        return video[:, :, :frames, :height, :width].float()
