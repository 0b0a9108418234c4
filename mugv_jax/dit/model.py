"""MUG-DiT in Flax NNX: the released video diffusion transformer.

Structure (docs/reference.md §1): 3D patch embed → [start, video tokens, end]; timestep + fps
sinusoidal embedders summed into one conditioning vector, projected once to 6×hidden
(AdaLN-single) and added to a per-block table; `depth` blocks of modulated self-attention (q/k
RMSNorm, interleaved 3D RoPE), affine-LN cross-attention to the caption, modulated GELU-tanh MLP;
a modulated final layer; unpatchify and crop.

Per-block parameters are stacked over layers (leading axis) and the blocks run under
`jax.lax.scan`, so compile time does not grow with depth and the layout matches Megatron's stacked
`torch_dist` tensors. Parameters are float32; `compute_dtype` sets the matmul dtype. Norm
statistics, RoPE, sinusoids and the modulation sum stay in float32, and the residual stream is
float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mugv.config import DiTConfig
from mugv_jax.dit import ops
from mugv_jax.parallel import context_parallel as cp
from mugv_jax.parallel.attention import BACKENDS, dot_product_attention
from mugv_jax.parallel.sharding import constrain

F32 = jnp.float32

# Activations the block tags with `checkpoint_name`, so a remat policy can name what it keeps:
#   qkv_proj  the fused q/k/v projection of self-attention, [B, N, 3, H, D]
#   attn_out  the self-attention output [B, N, H, D] (and, from the fused kernels and the ring,
#             the output and log-sum-exp their backward needs: saved, the kernel is not re-run)
ACTIVATION_NAMES = ("qkv_proj", "attn_out")


def _offload(*names):
    # Keep the named activations in pinned host memory instead of HBM (GPU/TPU with host offload;
    # the CPU backend has no separate host memory space).
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(names),
        offload_src="device",
        offload_dst="pinned_host",
    )


# Activation-recompute policies for the scanned block: jax's generic ones, and named save-lists
# over ACTIVATION_NAMES (MaxText's habit).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in backward
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    # Neither the projections nor the attention kernel's forward are recomputed.
    "save_qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv_proj", "attn_out"),
    "offload_qkv_proj": _offload("qkv_proj"),
    "offload_attn_out": _offload("attn_out"),
}


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How the model computes, as opposed to what it computes (DiTConfig)."""

    compute_dtype: jnp.dtype = F32
    attention: str = "xla"
    remat: str = "none"
    # "none" | "ulysses" | "ring" over the mesh axes of the logical `length` axis
    # (mugv_jax/parallel/context_parallel.py). `attention="xla+ring"` sets both from one config string.
    context_parallel: str = "none"
    # LoRA's alpha / rank (mugv/lora.py), applied where the params carry adapters (lora_a, lora_b).
    lora_scale: float = 0.0

    def __post_init__(self):
        if "+" in self.attention:
            backend, mode = self.attention.split("+", 1)
            object.__setattr__(self, "attention", backend)
            object.__setattr__(self, "context_parallel", mode)
        if self.attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; choose from {sorted(BACKENDS)}")
        if self.context_parallel not in cp.MODES:
            raise ValueError(f"unknown context_parallel mode {self.context_parallel!r}; choose from {cp.MODES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype))

    @property
    def precision(self):
        # Full-precision matmuls when asked for float32: TPU/GPU would otherwise use bf16 passes.
        return jax.lax.Precision.HIGHEST if self.compute_dtype == F32 else None


# --- initialisers (reference trainer, docs/reference.md §1.8) ---------------------------------


def _normal(std):
    return jax.nn.initializers.normal(stddev=std)


def _torch_default_uniform(fan_in):
    # PyTorch's Linear/Conv default: U(±1/√fan_in) for both weight (kaiming a=√5) and bias.
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=F32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _param(rngs, init, shape, axes):
    assert len(axes) == len(shape), (axes, shape)
    return nnx.Param(init(rngs.params(), shape, F32), logical_axes=tuple(axes))


def _zeros(shape, axes):
    return nnx.Param(jnp.zeros(shape, F32), logical_axes=tuple(axes))


def _ones(shape, axes):
    return nnx.Param(jnp.ones(shape, F32), logical_axes=tuple(axes))


class Linear(nnx.Module):
    """kernel [in..., out...] with a bias over the output axes; torch-default init unless given."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, rngs, init=None, stack: int | None = None):
        fan_in = math.prod(in_shape)
        lead, lead_axes = ((stack,), ("layers",)) if stack else ((), ())
        w_init = init or _torch_default_uniform(fan_in)
        b_init = _torch_default_uniform(fan_in) if init is None else jax.nn.initializers.zeros
        self.kernel = _param(rngs, w_init, (*lead, *in_shape, *out_shape), (*lead_axes, *in_axes, *out_axes))
        self.bias = _param(rngs, b_init, (*lead, *out_shape), (*lead_axes, *out_axes))


class MLPEmbedder(nnx.Module):
    """Linear → SiLU → Linear (the timestep/fps embedders)."""

    def __init__(self, in_dim, hidden, in_axis, *, rngs):
        self.fc1 = Linear((in_dim,), (hidden,), (in_axis,), ("embed",), rngs=rngs)
        self.fc2 = Linear((hidden,), (hidden,), ("mlp",), ("embed",), rngs=rngs)


class PatchEmbed(nnx.Module):
    def __init__(self, config: DiTConfig, *, rngs):
        fan_in = config.in_channels * config.patch_volume
        self.kernel = _param(
            rngs,
            _torch_default_uniform(fan_in),
            (*config.patch_size, config.in_channels, config.hidden_size),
            ("patch", "patch", "patch", "channels", "embed"),
        )
        self.bias = _param(rngs, _torch_default_uniform(fan_in), (config.hidden_size,), ("embed",))


class RMSNormScale(nnx.Module):
    def __init__(self, depth, dim):
        self.scale = _ones((depth, dim), ("layers", "head_dim"))


class SelfAttentionParams(nnx.Module):
    def __init__(self, config: DiTConfig, std, out_std, *, rngs):
        c, h, d, L = config.hidden_size, config.num_heads, config.head_dim, config.depth
        self.qkv = Linear(
            (c,), (3, h, d), ("embed",), ("qkv", "heads", "head_dim"), rngs=rngs, init=_normal(std), stack=L
        )
        self.q_norm = RMSNormScale(L, d)
        self.k_norm = RMSNormScale(L, d)
        self.proj = Linear((h, d), (c,), ("heads", "head_dim"), ("embed",), rngs=rngs, init=_normal(out_std), stack=L)


class CrossAttentionParams(nnx.Module):
    def __init__(self, config: DiTConfig, std, out_std, *, rngs):
        c, h, d, L = config.hidden_size, config.num_heads, config.head_dim, config.depth
        self.q = Linear((c,), (h, d), ("embed",), ("heads", "head_dim"), rngs=rngs, init=_normal(std), stack=L)
        self.kv = Linear(
            (c,), (2, h, d), ("embed",), ("qkv", "heads", "head_dim"), rngs=rngs, init=_normal(std), stack=L
        )
        self.q_norm = RMSNormScale(L, d)
        self.k_norm = RMSNormScale(L, d)
        self.proj = Linear((h, d), (c,), ("heads", "head_dim"), ("embed",), rngs=rngs, init=_normal(out_std), stack=L)


class LayerNormParams(nnx.Module):
    def __init__(self, depth, dim):
        self.scale = _ones((depth, dim), ("layers", "embed"))
        self.bias = _zeros((depth, dim), ("layers", "embed"))


class MLPParams(nnx.Module):
    def __init__(self, config: DiTConfig, std, out_std, *, rngs):
        c, f, L = config.hidden_size, config.mlp_hidden_size, config.depth
        self.fc1 = Linear((c,), (f,), ("embed",), ("mlp",), rngs=rngs, init=_normal(std), stack=L)
        self.fc2 = Linear((f,), (c,), ("mlp",), ("embed",), rngs=rngs, init=_normal(out_std), stack=L)


class Blocks(nnx.Module):
    """All transformer blocks, every parameter stacked over layers."""

    def __init__(self, config: DiTConfig, *, rngs):
        c, L = config.hidden_size, config.depth
        std = 0.014
        out_std = std / math.sqrt(2 * L)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (L, 6, c), F32) / math.sqrt(c),
            logical_axes=("layers", "modulation", "embed"),
        )
        self.attn = SelfAttentionParams(config, std, out_std, rngs=rngs)
        self.cross_attn_norm = LayerNormParams(L, c)
        self.cross_attn = CrossAttentionParams(config, std, out_std, rngs=rngs)
        self.mlp = MLPParams(config, std, out_std, rngs=rngs)


class FinalLayer(nnx.Module):
    def __init__(self, config: DiTConfig, *, rngs):
        c = config.hidden_size
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (2, c), F32) / math.sqrt(c), logical_axes=("modulation", "embed")
        )
        self.linear = Linear((c,), (config.patch_volume * config.out_channels,), ("embed",), ("patch",), rngs=rngs)


# --- the scanned block ---------------------------------------------------------------------------


def _dense(x, p, opts: RuntimeOptions, n_in: int = 1):
    """x[..., in...] · kernel[in..., out...] + bias, in the compute dtype; plus the LoRA update
    scale · (x·A)·B where the params carry an adapter (A [in..., r], B [r, out...])."""
    dt = opts.compute_dtype
    k = p["kernel"]
    contract = tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))
    dot = lambda a, w, c: jax.lax.dot_general(
        a.astype(dt), w.astype(dt), (c, ((), ())), precision=opts.precision, preferred_element_type=F32
    )
    y = dot(x, k, contract)
    if "lora_a" in p:
        if not opts.lora_scale:
            raise ValueError("params carry LoRA adapters but RuntimeOptions.lora_scale is 0 (set alpha / rank)")
        low = dot(x, p["lora_a"], contract)  # [..., r]
        y = y + opts.lora_scale * dot(low, p["lora_b"], ((low.ndim - 1,), (0,)))
    return (y + p["bias"].astype(F32)).astype(dt)


def _block(p, x, cond, config: DiTConfig, opts: RuntimeOptions):
    """One MUG-DiT block on the float32 residual stream x [B, N+2, C]."""
    token_mask, mod_t, mod_0, rope_cos, rope_sin, text, text_mask, self_mask = cond
    eps = config.norm_eps
    dt = opts.compute_dtype
    # AdaLN-single: per-block table + shared projection, per token t or t=0 (float32).
    table = p["scale_shift_table"].astype(F32)
    chunks = [ops.select_per_token(token_mask, mod_t[:, i] + table[i], mod_0[:, i] + table[i]) for i in range(6)]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks

    # Self-attention.
    h = ops.modulate(ops.layer_norm(x, eps), shift_msa, scale_msa)
    qkv = checkpoint_name(_dense(h, p["attn"]["qkv"], opts), "qkv_proj")  # [B, N, 3, H, D]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = ops.apply_rope(ops.rms_norm(q, p["attn"]["q_norm"]["scale"], eps), rope_cos, rope_sin)
    k = ops.apply_rope(ops.rms_norm(k, p["attn"]["k_norm"]["scale"], eps), rope_cos, rope_sin)
    q = constrain(q, ("batch", "length", "act_heads", None))
    a = cp.self_attention(
        q,
        k,
        v,
        key_mask=self_mask,
        mode=opts.context_parallel,
        implementation=opts.attention,
        precision=opts.precision,
        residual_name="attn_out",
    )
    a = _dense(a, p["attn"]["proj"], opts, n_in=2)
    x = x + gate_msa * a.astype(F32)

    # Cross-attention to the caption: affine LN, no modulation, no gate.
    ca = p["cross_attn"]
    h = ops.layer_norm(x, eps, p["cross_attn_norm"]["scale"], p["cross_attn_norm"]["bias"])
    q = ops.rms_norm(_dense(h, ca["q"], opts), ca["q_norm"]["scale"], eps)
    kv = _dense(text, ca["kv"], opts)  # [B, L, 2, H, D]
    k = ops.rms_norm(kv[:, :, 0], ca["k_norm"]["scale"], eps)
    a = dot_product_attention(
        q, k, kv[:, :, 1], key_mask=text_mask, implementation=opts.attention, precision=opts.precision
    )
    x = x + _dense(a, ca["proj"], opts, n_in=2).astype(F32)

    # MLP.
    h = ops.modulate(ops.layer_norm(x, eps), shift_mlp, scale_mlp)
    m = ops.gelu_tanh(_dense(h, p["mlp"]["fc1"], opts).astype(F32)).astype(dt)
    m = _dense(m, p["mlp"]["fc2"], opts)
    x = x + gate_mlp * m.astype(F32)
    return constrain(x, ("batch", "length", "act_embed"))


# --- the model -----------------------------------------------------------------------------------


class MUGDiT(nnx.Module):
    """The MUG-V video DiT. Call with the release model's inputs (see `__call__`)."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, options: RuntimeOptions | None = None):
        self.config = config
        self.options = options or RuntimeOptions()
        c = config.hidden_size
        self.start_token = _param(rngs, _normal(0.02), (c,), ("embed",))
        self.end_token = _param(rngs, _normal(0.02), (c,), ("embed",))
        self.x_embedder = PatchEmbed(config, rngs=rngs)
        self.t_embedder = MLPEmbedder(config.frequency_dim, c, "frequency", rngs=rngs)
        self.fps_embedder = MLPEmbedder(config.frequency_dim, c, "frequency", rngs=rngs)
        self.t_block = Linear((c,), (6 * c,), ("embed",), ("mlp",), rngs=rngs)
        self.y_embedder = _CaptionEmbedder(config, rngs=rngs)
        self.blocks = Blocks(config, rngs=rngs)
        self.final_layer = FinalLayer(config, rngs=rngs)

    # The parameters as a nested dict of arrays: the pure functions below take this.
    def _params(self):
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, x, timestep, y, mask=None, x_mask=None, fps=None, frame_indice=None, *, capture: bool = False):
        """Release-layout forward.

        x: [B, C_in, T, H, W] latents; timestep: [B] in [0, 1000]; y: [B, 1, L, D] caption features;
        mask: [B, L] (1 = valid token; default all valid); x_mask: [B, T] (True = generated frame,
        False = conditioning frame modulated with t=0; default all True); fps: [B] or [1];
        frame_indice: [B or 1, T+2] temporal RoPE positions (default 0..T+1).
        Returns [B, out_channels, T, H, W] float32 (channels 0..C_in−1 are the velocity), or
        (output, activations) with capture=True.
        """
        if fps is None:
            raise ValueError(
                "MUGDiT needs `fps` ([B] or [1]): the model is conditioned on it "
                "(the release samples with 30, the released training data used 24)"
            )
        return forward(
            self._params(), self.config, self.options, x, timestep, y, mask, x_mask, fps, frame_indice, capture=capture
        )


class _CaptionEmbedder(nnx.Module):
    def __init__(self, config: DiTConfig, *, rngs):
        c = config.hidden_size
        self.fc1 = Linear((config.text_dim,), (c,), ("text_embed",), ("embed",), rngs=rngs)
        self.fc2 = Linear((c,), (c,), ("mlp",), ("embed",), rngs=rngs)


def _mlp_embed(p, feats, opts):
    h = _dense(feats, p["fc1"], opts).astype(F32)
    return _dense(jax.nn.silu(h), p["fc2"], opts).astype(F32)


def _check_inputs(x, timestep, y, mask, x_mask, frame_indice, config):
    if x.ndim != 5 or x.shape[1] != config.in_channels:
        raise ValueError(f"x must be [B, {config.in_channels}, T, H, W], got shape {list(x.shape)}")
    b, _, t = x.shape[:3]
    if timestep.shape != (b,):
        raise ValueError(f"timestep must be [B]=[{b}], got shape {list(timestep.shape)}")
    if y.ndim != 4 or y.shape[0] != b or y.shape[1] != 1 or y.shape[3] != config.text_dim:
        raise ValueError(f"y must be [B, 1, L, {config.text_dim}] with B={b}, got shape {list(y.shape)}")
    if mask is not None and mask.shape != (b, y.shape[2]):
        raise ValueError(f"mask must be [B, L]=[{b}, {y.shape[2]}], got shape {list(mask.shape)}")
    if x_mask is not None and tuple(x_mask.shape) != (b, t):
        raise ValueError(f"x_mask must be [B, T]=[{b}, {t}], got shape {list(x_mask.shape)}")
    gt = -(-t // config.patch_size[0])
    if frame_indice is not None and (
        frame_indice.ndim != 2 or frame_indice.shape[1] != gt + 2 or frame_indice.shape[0] not in (1, b)
    ):
        raise ValueError(f"frame_indice must be [B or 1, T+2]=[{b}, {gt + 2}], got shape {list(frame_indice.shape)}")


def forward(
    params,
    config: DiTConfig,
    opts: RuntimeOptions,
    x,
    timestep,
    y,
    mask=None,
    x_mask=None,
    fps=None,
    frame_indice=None,
    *,
    capture: bool = False,
):
    """The pure forward pass over a nested parameter dict (what `jax.jit` and the trainer use)."""
    x = jnp.asarray(x)
    timestep, y = jnp.asarray(timestep), jnp.asarray(y)
    _check_inputs(x, timestep, y, mask, x_mask, frame_indice, config)
    b, _, t, hh, ww = x.shape
    pt, ph, pw = config.patch_size
    gt, gh, gw = -(-t // pt), -(-hh // ph), -(-ww // pw)
    n_video = gt * gh * gw
    acts = {}

    # Conditioning vectors: t and t=0, each plus the fps embedding.
    timestep = timestep.astype(F32)
    if config.round_timestep_to_bf16:
        timestep = timestep.astype(jnp.bfloat16).astype(F32)
    fps = jnp.broadcast_to(jnp.asarray(fps, F32).reshape(-1), (b,))
    emb = lambda p, v: _mlp_embed(p, ops.sinusoidal_embedding(v, config.frequency_dim), opts)
    t_emb = emb(params["t_embedder"], timestep)
    t0_emb = emb(params["t_embedder"], jnp.zeros_like(timestep))
    fps_emb = emb(params["fps_embedder"], fps)
    cond_t, cond_0 = t_emb + fps_emb, t0_emb + fps_emb
    mod_t = _dense(jax.nn.silu(cond_t), params["t_block"], opts).astype(F32)
    mod_0 = _dense(jax.nn.silu(cond_0), params["t_block"], opts).astype(F32)
    if capture:
        acts.update(
            {
                "t_embedder.call0": t_emb,
                "t_embedder.call1": t0_emb,
                "fps_embedder": fps_emb,
                "t_block.call0": mod_t,
                "t_block.call1": mod_0,
            }
        )

    # Caption: LN → fc1 → GELU(tanh) → fc2 → LN over every position; masking happens in attention.
    yp = params["y_embedder"]
    text = ops.layer_norm(y[:, 0], config.caption_norm_eps)
    text = _dense(ops.gelu_tanh(_dense(text, yp["fc1"], opts).astype(F32)), yp["fc2"], opts)
    text = ops.layer_norm(text, config.caption_norm_eps)
    if capture:
        acts["y_embedder"] = text[:, None]
    # Laid out like every activation (samples over data × fsdp): left free, the caption takes the
    # embedder weights' `embed` sharding, and every layer's cross-attention k/v projection of the
    # whole micro-batch's captions ends in an all-reduce over fsdp.
    text = constrain(text.astype(opts.compute_dtype), ("batch", "text_length", "act_embed"))
    text_mask = jnp.ones(y.shape[:1] + y.shape[2:3], bool) if mask is None else jnp.asarray(mask).astype(bool)

    # Patch embed (zero-pad each axis up to a patch multiple, as the release does), (t,h,w) order.
    xp = jnp.pad(x.astype(F32), ((0, 0), (0, 0), (0, gt * pt - t), (0, gh * ph - hh), (0, gw * pw - ww)))
    xp = xp.reshape(b, config.in_channels, gt, pt, gh, ph, gw, pw).transpose(0, 2, 4, 6, 3, 5, 7, 1)
    # Patches in token order, laid out like the tokens before the projection: projected as
    # [B, gt, gh, gw, ...] and then flattened, the partitioner gave the projection a batch × embed
    # tiling that the flatten to [B, N, C] cannot keep, and replicated it to re-lay it over
    # (batch, length) ("involuntary full rematerialization" under fsdp × context, Ulysses).
    patches = constrain(
        xp.reshape(b, n_video, pt, ph, pw, config.in_channels), ("batch", "length", None, None, None, None)
    )
    tokens = _dense(
        patches,
        {"kernel": params["x_embedder"]["kernel"], "bias": params["x_embedder"]["bias"]},
        opts,
        n_in=4,
    ).astype(F32)
    if capture:
        acts["x_embedder"] = tokens
    start = jnp.broadcast_to(params["start_token"].astype(F32), (b, 1, config.hidden_size))
    end = jnp.broadcast_to(params["end_token"].astype(F32), (b, 1, config.hidden_size))
    h = jnp.concatenate([start, tokens, end], axis=1)
    # Context parallel shards the token axis: pad it to a multiple of the degree; padded tokens
    # are masked out as keys and dropped at the end.
    n_tok = n_video + 2
    n_pad = -n_tok % cp.sequence_multiple()
    h = jnp.pad(h, ((0, 0), (0, n_pad), (0, 0)))
    h = constrain(h, ("batch", "length", "act_embed"))

    # Which tokens take the real-t modulation: generated frames' tokens; never start/end.
    frame_mask = jnp.ones((b, t), bool) if x_mask is None else jnp.asarray(x_mask).astype(bool)
    frame_mask = jnp.pad(frame_mask, ((0, 0), (0, gt * pt - t)))[:, ::pt]
    video_mask = jnp.broadcast_to(frame_mask[:, :, None], (b, gt, gh * gw)).reshape(b, n_video)
    token_mask = jnp.pad(video_mask, ((0, 0), (1, 1 + n_pad)), constant_values=False)

    if frame_indice is None:
        frame_indice = jnp.arange(gt + 2, dtype=jnp.int32)[None]
    frame_indice = jnp.broadcast_to(jnp.asarray(frame_indice), (b, gt + 2))
    angles = ops.rope_angles(ops.rope_positions(frame_indice, (gt, gh, gw), config), config)
    angles = jnp.pad(angles, ((0, 0), (0, n_pad), (0, 0)))
    rope_cos, rope_sin = ops.rope_cos_sin(angles)
    rope_cos = constrain(rope_cos, ("batch", "length", None, None))
    rope_sin = constrain(rope_sin, ("batch", "length", None, None))
    self_mask = None if n_pad == 0 else jnp.broadcast_to(jnp.arange(n_tok + n_pad) < n_tok, (b, n_tok + n_pad))

    cond = (
        token_mask,
        mod_t.reshape(b, 6, -1),
        mod_0.reshape(b, 6, -1),
        rope_cos,
        rope_sin,
        text,
        text_mask,
        self_mask,
    )

    def body(carry, layer_params):
        out = _block(layer_params, carry, cond, config, opts)
        return out, (out if capture else None)

    policy = REMAT_POLICIES[opts.remat]
    if opts.remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    h, per_block = jax.lax.scan(body, h, params["blocks"])
    if capture:
        for i in range(config.depth):
            acts[f"blocks.{i}"] = per_block[i][:, :n_tok]

    # Final layer on video tokens, modulated by the pre-t_block conditioning vector.
    fl = params["final_layer"]
    hv = h[:, 1 : 1 + n_video]
    # Laid out like the tokens: left free, the partitioner splits the modulation's gradient over
    # `embed` (the table's weight sharding) and re-lays the [B, N, C] activation gradient to match
    # ("involuntary full rematerialization" in the planner's log).
    c_sel = constrain(ops.select_per_token(video_mask, cond_t, cond_0), ("batch", "length", "act_embed"))
    table = fl["scale_shift_table"].astype(F32)
    hv = ops.modulate(ops.layer_norm(hv, config.norm_eps), c_sel + table[0], c_sel + table[1])
    out = _dense(hv, fl["linear"], opts).astype(F32)  # [B, N, pt·ph·pw·C_out]
    if capture:
        acts["final_layer"] = out

    # Unpatchify: features ordered (pt, ph, pw, c_out), c_out fastest; then crop.
    co = config.out_channels
    out = out.reshape(b, gt, gh, gw, pt, ph, pw, co).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    out = out.reshape(b, co, gt * pt, gh * ph, gw * pw)[:, :, :t, :hh, :ww]
    return (out, acts) if capture else out
