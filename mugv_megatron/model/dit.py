"""The MUG-DiT on megatron.core, called with the release model's inputs.

Forward (docs/reference.md §1.2–§1.7, with the release's patch padding and output crop):
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
rank's chunk (the reference gets both wrong, docs/reference.md §4.2).

Context parallelism (CP > 1): the padded sequence is cut into CP contiguous chunks before the
sequence-parallel split; see `mugv_megatron.parallel.context_parallel` for attention and gradients.

Pipeline parallelism (PP > 1): a stage holds its slice of the layers; every stage holds all the
embedders (patch, timestep, fps, caption, start/end tokens, timestep_block), because every layer
needs the modulation table and the text, and recomputes the conditioning from the same batch.
Their parameters are flagged `pipeline_parallel`, so megatron's finalize_model_grads sums their
grads over the pipeline group (config.has_cond_embedder). Only the last stage has the final
layer. A stage after the first takes its input hidden state from `set_input_tensor` (megatron's
schedules call it) and a stage before the last returns the hidden state [S_local, B, C];
`mugv_megatron.parallel.pipeline_parallel` runs the schedule.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from mugv.config import DiTConfig
from mugv_megatron.memory import padded_length
from mugv_megatron.model.attention import trailing_padding
from mugv_megatron.model.embedders import CaptionEmbedder, FinalLayer, PatchEmbed3D, SinusoidEmbedder, unpatchify
from mugv_megatron.model.layer import MODULATION_ROWS, LayerInputs, MUGDiTBlock
from mugv_megatron.model.rope import rope_angles, rope_cos_sin
from mugv_megatron.parallel import context_parallel

SPECIAL_TOKEN_INIT_STD = 0.02


def valid_tokens_first(text: torch.Tensor, valid: torch.Tensor):
    """(text [B, L, C], valid [B, L]) with each sample's valid caption tokens moved to the front.

    The fused attention kernels read a padding mask as a length (TE counts the unmasked keys), so
    the caption must be valid-first; the data pipeline writes it so, and a caption in any other
    order is reordered here, which changes nothing: text tokens are only attended to, as a set
    (no position enters cross-attention). Checked on the host, where the mask is read anyway.
    """
    host = valid.cpu()
    empty = (~host.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} have no valid text token in `mask`")
    counts = host.sum(dim=1, keepdim=True)
    if torch.equal(host, torch.arange(host.shape[1]).unsqueeze(0) < counts):
        return text, valid
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    text = text.gather(1, order.unsqueeze(-1).expand_as(text))
    return text, valid.gather(1, order)


def _pipeline_position(tc) -> tuple[bool, bool]:
    if tc.pipeline_model_parallel_size == 1:
        return True, True
    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    )


class MUGDiT(MegatronModule):
    def __init__(
        self,
        config: DiTConfig,
        transformer_config,
        layer_spec,
        *,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        layer_offset: int | None = None,
        num_layers: int | None = None,
    ):
        """`pre_process` / `post_process` (first / last pipeline stage) and the stage's layers
        (`layer_offset`, `num_layers`) default to this rank's place in megatron's pipeline
        group; without pipeline parallelism: both True, all layers."""
        super().__init__(config=transformer_config)
        if config.patch_size[0] != 1:
            raise ValueError(
                f"patch_size {config.patch_size}: x_mask and frame_indice are per latent frame, "
                f"so the temporal patch size must be 1"
            )
        tc = transformer_config
        if tc.num_layers != config.depth:
            raise ValueError(f"transformer config has {tc.num_layers} layers, DiTConfig.depth is {config.depth}")
        if tc.context_parallel_size != context_parallel.size():
            raise ValueError(
                f"transformer config has context-parallel size {tc.context_parallel_size}, "
                f"megatron's parallel state {context_parallel.size()}"
            )
        self.dit_config = config
        # Read by megatron's pipeline schedules and finalize_model_grads (no word embeddings to
        # tie between the first and last stage).
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        first, last = _pipeline_position(tc)
        self.pre_process = first if pre_process is None else pre_process
        self.post_process = last if post_process is None else post_process
        self._input_tensor = None
        dtype = tc.params_dtype
        c = config.hidden_size
        self.x_embedder = PatchEmbed3D(config, dtype)
        self.start_token = torch.nn.Parameter(torch.randn(c, dtype=dtype) * SPECIAL_TOKEN_INIT_STD)
        self.end_token = torch.nn.Parameter(torch.randn(c, dtype=dtype) * SPECIAL_TOKEN_INIT_STD)
        self.timestep_embedder = SinusoidEmbedder(config, dtype)
        self.fps_embedder = SinusoidEmbedder(config, dtype)
        self.timestep_block = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(c, MODULATION_ROWS * c, dtype=dtype))
        self.context_embedder = CaptionEmbedder(config, dtype)
        # Replicated on every pipeline stage: their grads are summed over the pipeline group.
        for module in (
            self.x_embedder,
            self.timestep_embedder,
            self.fps_embedder,
            self.timestep_block,
            self.context_embedder,
        ):
            for p in module.parameters():
                p.pipeline_parallel = True
        for p in (self.start_token, self.end_token):
            p.pipeline_parallel = True
        self.decoder = MUGDiTBlock(tc, layer_spec, num_layers=num_layers, layer_offset=layer_offset)
        self.final_layer = FinalLayer(config, dtype, tc.sequence_parallel) if self.post_process else None

    def set_input_tensor(self, input_tensor) -> None:
        """The hidden state from the previous pipeline stage (megatron's schedules pass a list)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"MUGDiT takes one input tensor per stage, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self._input_tensor = input_tensor

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
            raise ValueError(f"y must be [B, 1, L, {cfg.text_dim}] with B = {b}, got {list(y.shape)}")
        if mask is not None and tuple(mask.shape) != (b, y.shape[2]):
            raise ValueError(f"mask must be [B, L] = [{b}, {y.shape[2]}], got {list(mask.shape)}")
        if x_mask is not None and tuple(x_mask.shape) != (b, t):
            raise ValueError(f"x_mask must be [B, T] = [{b}, {t}], got {list(x_mask.shape)}")
        if fps is None or tuple(fps.shape) != (b,):
            raise ValueError(f"fps must be given as [B] = [{b}], got {None if fps is None else list(fps.shape)}")
        if frame_indice is not None and tuple(frame_indice.shape) != (b, t + 2):
            raise ValueError(f"frame_indice must be [B, T+2] = [{b}, {t + 2}], got {list(frame_indice.shape)}")

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        frame_indice: torch.Tensor | None = None,
        activations: dict | None = None,
    ) -> torch.Tensor:
        """Release-layout call → [B, out_channels, T, H, W] float32.

        x [B, C_in, T, H, W]; timestep [B]; y [B, 1, L, D]; mask [B, L] (1 = valid token);
        x_mask [B, T] (True = generated frame; default all True); fps [B];
        frame_indice [B, T+2] (default 0..T+1). If `activations` is a dict it receives the
        intermediate tensors under the golden-vector names (x_embedder, t_embedder.call0, …).

        Under pipeline parallelism every stage is called with the same inputs; a stage before
        the last returns its hidden state [S_local, B, C] instead of the video, a stage after
        the first reads its input from `set_input_tensor`. Under context parallelism every CP
        rank returns the whole video.
        """
        self._check_inputs(x, timestep, y, mask, x_mask, fps, frame_indice)
        cfg = self.dit_config
        device, dtype = self._device(), self.config.params_dtype
        b, _, frames, height, width = x.shape

        def capture(name, tensor):
            if activations is not None:
                activations[name] = tensor.detach().float().cpu()

        # 1. Patches (the first pipeline stage embeds them; later stages only need the grid).
        pt, ph, pw = cfg.patch_size
        grid = (-(-frames // pt), -(-height // ph), -(-width // pw))
        n = grid[0] * grid[1] * grid[2]
        tokens = None
        if self.pre_process:
            patches = self.x_embedder(x.to(device=device, dtype=dtype))
            tokens = patches.flatten(2).transpose(1, 2)  # [B, N, C]
            capture("x_embedder", tokens)

        # 2. Timestep / fps conditioning.
        t = timestep.to(device)
        if cfg.round_timestep_to_bf16:
            t = t.to(torch.bfloat16)
        t_emb = self.timestep_embedder(t)
        t0_emb = self.timestep_embedder(torch.zeros_like(t))
        fps_emb = self.fps_embedder(fps.to(device))
        e_t, e_0 = t_emb + fps_emb, t0_emb + fps_emb
        m_t, m_0 = self.timestep_block(e_t), self.timestep_block(e_0)
        for name, value in (
            ("t_embedder.call0", t_emb),
            ("t_embedder.call1", t0_emb),
            ("fps_embedder", fps_emb),
            ("t_block.call0", m_t),
            ("t_block.call1", m_0),
        ):
            capture(name, value)

        # 3. Text.
        text = self.context_embedder(y[:, 0].to(device=device, dtype=dtype))  # [B, L, C]
        capture("y_embedder", text[:, None])
        valid = (torch.ones(text.shape[:2], dtype=torch.bool) if mask is None else mask.to(torch.bool)).to(device)
        text, valid = valid_tokens_first(text, valid)
        context = text.transpose(0, 1)  # [L, B, C]
        context_padding = (~valid).view(b, 1, 1, -1)

        # 4. Sequence with start/end tokens, per-token timestep choice, RoPE.
        c = cfg.hidden_size
        length = n + 2
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = tp_group.size()
        sp = self.config.sequence_parallel
        cp = context_parallel.size()
        padded = padded_length(length, tp=tp, sp=sp, cp=cp)
        cp_lo, cp_hi = context_parallel.shard_bounds(padded)

        generated = (torch.ones(b, frames, dtype=torch.bool) if x_mask is None else x_mask.to(torch.bool)).to(device)
        per_video_token = generated.repeat_interleave(n // frames, dim=1)  # [B, N]
        noisy = torch.zeros(padded, b, dtype=torch.bool, device=device)
        noisy[1 : length - 1] = per_video_token.t()
        noisy = noisy[cp_lo:cp_hi]

        if frame_indice is None:
            frame_indice = torch.arange(frames + 2).expand(b, -1)
        cos, sin = rope_cos_sin(rope_angles(grid, frame_indice.cpu(), cfg, total_tokens=padded), dtype, device)
        cos, sin = cos[cp_lo:cp_hi], sin[cp_lo:cp_hi]
        self_key_padding = trailing_padding(b, padded, length, device)

        if self.pre_process:
            seq = torch.cat(
                [self.start_token.view(1, 1, c).expand(b, 1, c), tokens, self.end_token.view(1, 1, c).expand(b, 1, c)],
                dim=1,
            )
            hidden = torch.nn.functional.pad(seq, (0, 0, 0, padded - length)).transpose(0, 1)
            hidden = hidden[cp_lo:cp_hi].contiguous()  # [S_cp, B, C]
            if sp:
                hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=tp_group)
        else:
            hidden = self._input_tensor
            local = (cp_hi - cp_lo) // (tp if sp else 1)
            if hidden is None or tuple(hidden.shape) != (local, b, c):
                raise ValueError(
                    f"pipeline stage {parallel_state.get_pipeline_model_parallel_rank()}: the "
                    f"input tensor from the previous stage must be [{local}, {b}, {c}], got "
                    f"{None if hidden is None else list(hidden.shape)}"
                )

        if sp:
            chunk = (cp_hi - cp_lo) // tp
            rank = tp_group.rank()
            noisy = noisy[rank * chunk : (rank + 1) * chunk]
            # Replicated conditioning used by local tokens only: sum its grads over the ranks.
            m_t, m_0, e_t, e_0 = (
                tensor_parallel.copy_to_tensor_model_parallel_region(v, group=tp_group) for v in (m_t, m_0, e_t, e_0)
            )

        inputs = LayerInputs(
            modulation_t=m_t,
            modulation_t0=m_0,
            noisy=noisy.unsqueeze(-1),
            rope_cos=cos,
            rope_sin=sin,
            self_key_padding=self_key_padding,
            context=context,
            context_padding=context_padding,
        )

        def gather_sequence(h):
            """Local tokens → the whole padded sequence (no grads: for inspection only)."""
            if sp:
                h = tensor_parallel.gather_from_sequence_parallel_region(
                    h, tensor_parallel_output_grad=False, group=tp_group
                )
            return context_parallel.gather_output(h)

        def capture_block(i, h):
            if activations is not None:
                capture(f"blocks.{i}", gather_sequence(h.detach())[:length].transpose(0, 1))

        hidden = self.decoder(hidden, inputs, on_layer_output=capture_block)
        if not self.post_process:
            return hidden

        # 5. Final layer, back to video.
        emb = torch.where(noisy.unsqueeze(-1), e_t.unsqueeze(0), e_0.unsqueeze(0))
        out = self.final_layer(hidden, emb)
        if sp:
            out = tensor_parallel.gather_from_sequence_parallel_region(
                out, tensor_parallel_output_grad=False, group=tp_group
            )
        out = context_parallel.gather_output(out)
        out = out[1 : length - 1].transpose(0, 1)  # [B, N, P·C]
        capture("final_layer", out)
        video = unpatchify(out, grid, cfg)
        return video[:, :, :frames, :height, :width].float()
