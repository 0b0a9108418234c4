"""Analytic per-GPU memory of a Megatron MUG-DiT training step (no torch: runs anywhere, instantly).

What one GPU holds at the peak of a step, for a layout (TP, SP, PP, CP, micro-batch, recompute,
core attention) of a model config and a bucket:

* **state**: this rank's parameters (its TP shard of its PP stage's layers, plus the embedders
  every stage holds and the final layer on the last stage) × bytes per parameter: bf16 weights
  and the fp32 gradient buffer (`grad_reduce_in_fp32`) on every rank; fp32 main weights, Adam
  moments and the EMA sharded over data parallel × CP by the distributed optimizer.
* **activations**: what autograd keeps for backward, per layer and micro-batch, enumerated from
  the layer's code (`layer_activations`: each saved tensor is named there), split into the
  sequence-parallel region ([S/CP/TP, B, C] under SP), the tensor-parallel region ([S/CP, B, C/TP],
  [S/CP, B, F/TP]), the CP-gathered keys/values and the text. Recompute `full` keeps each layer's
  input and rebuilds one layer's activations at a time; `selective` drops the core attention's
  own residuals (the unfused scores; the fused kernels' log-sum-exp). The pipeline's first stage
  holds min(PP, micro-batches) micro-batches in flight (megatron's 1F1B).
* **working set** of a layer's backward (activation gradients), the embedders' and final layer's
  activations, the sequence-parallel all-gather buffer.

The dtypes of the saved tensors depend on how the step runs (`Dtypes`): the trainer computes under
CUDA autocast with bf16 weights, where LayerNorm runs (and returns) float32; the modulation, q/k
RMSNorm statistics, gated residual and RoPE are float32 in every mode (mugv_megatron/model/layer.py).
The test pins the estimate to saved-tensor bytes measured on the CPU (tests/mugv_megatron/
test_megatron_memory.py) and to the one peak measured on a GPU (docs/benchmarks.md, H200).
"""

from __future__ import annotations

import dataclasses
import functools
import math

from mugv.config import DiTConfig
from mugv.layouts import megatron as layout

GiB = 1024**3
F32 = 4
MODULATION_ROWS = 6  # shift/scale/gate × 2 per layer (mugv_megatron/model/layer.py)
RECOMPUTE = ("none", "selective", "full")
EMBEDDER_GRADIENTS = 3  # [S, B, C] gradients alive between the first layer and the patch embedding
ATTENTION = ("sdpa", "te", "megatron")  # fused (torch SDPA, Transformer Engine) or megatron's unfused


def padded_length(length: int, *, tp: int, sp: bool, cp: int) -> int:
    """The sequence length after padding to an even split over CP chunks and SP ranks."""
    multiple = cp * (tp if sp else 1)
    return -(-length // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the three kinds of saved tensors."""

    hidden: int  # the residual stream (the parameters' dtype)
    norm: int  # LayerNorm inputs as saved and outputs (float32 under CUDA autocast)
    compute: int  # matmul / attention outputs


def dtypes_for(compute_dtype: str, params_dtype: str, device: str = "cuda") -> Dtypes:
    """The trainer's dtypes: parameters in `params_dtype`, bf16 compute through autocast on
    `device` (CUDA autocast runs LayerNorm in float32, CPU autocast does not)."""
    size = {"float32": 4, "bfloat16": 2}
    p, c = size[params_dtype], size[compute_dtype]
    if c == 4:
        return Dtypes(p, p, p)
    return Dtypes(hidden=p, norm=F32 if device == "cuda" else c, compute=c)


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter held whole on every rank, and bytes sharded over data parallel × CP."""

    replicated: float
    sharded: float
    what: str


def state_bytes(distributed_optimizer: bool, params_dtype: str) -> StateBytes:
    """The trainer's parameter state (mugv_megatron/train/step.py, optim.py, ema.py)."""
    if distributed_optimizer:
        p = 2 if params_dtype == "bfloat16" else 4
        main = 4 if p == 2 else 0  # fp32 params are their own main weights
        return StateBytes(
            replicated=p + 4,
            sharded=main + 8 + 4,
            what=f"{params_dtype} weights + fp32 grad buffer; fp32 main weights, Adam moments, EMA over DP×CP",
        )
    return StateBytes(replicated=4 + 4 + 8 + 4, sharded=0, what="fp32 weights, grads, Adam moments, EMA (torch AdamW)")


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    sp: bool = False
    pp: int = 1
    cp: int = 1
    micro_batch: int = 1  # samples per data-parallel rank in one micro-batch
    recompute: str = "none"
    attention: str = "sdpa"

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.sp and self.tp < 2:
            raise ValueError("sequence parallel needs tp >= 2")

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def describe(self) -> str:
        return (
            f"TP {self.tp}{' + SP' if self.sp else ''}, PP {self.pp}, CP {self.cp}, micro-batch {self.micro_batch}, "
            f"recompute {self.recompute}, {self.attention} attention"
        )


@dataclasses.dataclass(frozen=True)
class Sample:
    """One micro-batch's geometry."""

    tokens: int  # self-attention sequence: video tokens + start/end
    text: int  # caption tokens
    latent_voxels: int  # latent frames × height × width (the input and output video)


# --- parameters ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def rank_parameters(config: DiTConfig, tp: int) -> tuple[int, int, int]:
    """(parameters of one layer on one TP rank, embedders on one TP rank, final layer) counted
    from the Megatron schema and its TP split rules (mugv/layouts/megatron.py)."""
    per_layer = embedders = final = 0
    for name, shape in layout.megatron_schema(config).items():
        n = math.prod(shape)
        if layout.tp_split_rule(name) != "replicated":
            n //= tp
        if name.startswith(layout.LAYER_PREFIX + "0."):
            per_layer += n
        elif name.startswith(layout.LAYER_PREFIX):
            continue
        elif name.startswith("final_layer."):
            final += n
        else:
            embedders += n
    return per_layer, embedders, final


def stage_parameters(config: DiTConfig, tp: int, pp: int, stage: int) -> int:
    per_layer, embedders, final = rank_parameters(config, tp)
    return per_layer * (config.depth // pp) + embedders + (final if stage == pp - 1 else 0)


# --- activations --------------------------------------------------------------------------------


def layer_activations(config: DiTConfig, sample: Sample, lay: Layout, dt: Dtypes) -> dict[str, float]:
    """Bytes one layer keeps for backward for one micro-batch without recompute, by part.

    Sequence-parallel region (s = S/CP/TP tokens under SP, S/CP without): the six modulation rows
    [s, B, 6, C] float32 (kept alive by the gates, views of it); three LayerNorms keep their
    input (norm dtype); the two adaLN modulations keep LN(x) and 1 + scale in float32 and their
    result (norm dtype: it is the next linear's saved input, like the cross-attention LN's
    output); the two gated residuals keep the branch in float32.
    Tensor-parallel region (S/CP tokens, C/TP and F/TP wide): q/k RMSNorm keep x in float32 and the
    normalised x (compute dtype), self- and cross-attention q; the core attention keeps q, k, v and
    its output (the output projection's input; CP gathers k and v over the whole sequence); the
    MLP keeps fc1's output (GELU's input) and GELU's output; unfused attention also keeps its
    [B, h, Sq, Sk] probabilities in float32 and in the compute dtype.
    """
    c, f, h = config.hidden_size, config.mlp_hidden_size, config.num_heads
    t = lay.tp
    s_full = padded_length(sample.tokens, tp=lay.tp, sp=lay.sp, cp=lay.cp)
    s_cp = s_full // lay.cp
    s_res = s_cp // t if lay.sp else s_cp
    b = lay.micro_batch
    nb, cb = dt.norm, dt.compute
    res, tpr = s_res * b, s_cp * b
    # In float32 the norms' `.float()` is a view of the fused qkv (kv) output, which then stays
    # whole: one more [.., C/TP] float32 than the separate q and k copies.
    fp32_views = F32 if cb == F32 else 0
    parts = {
        "modulation rows (fp32)": res * MODULATION_ROWS * c * F32,
        "norms and modulation": res * c * (6 * nb + 4 * F32) + res * 3 * 2 * F32,
        "gated residuals (fp32)": res * c * 2 * F32,
        "q/k RMSNorm": tpr * (c // t) * (3 * (F32 + cb) + fp32_views) + tpr * 3 * (h // t) * F32,
        "attention q, k, v, out": tpr * (c // t) * cb * (2 + 2 * lay.cp + 2),
        "MLP hidden": tpr * (f // t) * 2 * cb,
        "text keys/values": sample.text * b * (c // t) * (F32 + 3 * cb + fp32_views),
    }
    if lay.attention == "megatron":
        # float32 softmax output, and its cast to the compute dtype (the same tensor in float32).
        probs = F32 + (cb if cb != F32 else 0)
        parts["attention probabilities (unfused)"] = tpr * (h // t) * (s_full + sample.text) * probs
    else:
        parts["attention softmax statistics"] = tpr * (h // t) * 2 * F32
    return parts


def kept_activations(parts: dict[str, float], recompute: str) -> float:
    """What a layer keeps between its forward and its backward under `recompute` (full: only its
    input, counted by the caller)."""
    if recompute == "full":
        return 0.0
    drop = ("attention probabilities (unfused)", "attention softmax statistics") if recompute == "selective" else ()
    return sum(v for k, v in parts.items() if k not in drop)


def model_activations(config: DiTConfig, sample: Sample, lay: Layout, dt: Dtypes, last_stage: bool) -> dict[str, float]:
    """Per micro-batch, outside the layers: the RoPE tables (float32, shared by every layer), the
    text (context and caption embedder) and the patch-embed input; on the last stage the final
    layer (LN, modulation, linear) and the gathered output, its float32 copy and the loss terms."""
    c, d = config.hidden_size, config.head_dim
    s_full = padded_length(sample.tokens, tp=lay.tp, sp=lay.sp, cp=lay.cp)
    s_cp = s_full // lay.cp
    s_res = s_cp // lay.tp if lay.sp else s_cp
    b = lay.micro_batch
    out = {
        "RoPE tables (fp32)": 2 * s_cp * b * d * F32,
        "text and caption embedder": sample.text
        * b
        * (2 * dt.norm * config.text_dim + 2 * dt.compute * c + 2 * dt.norm * c),
        "patch-embed input": b * config.in_channels * sample.latent_voxels * dt.hidden,
    }
    if last_stage:
        out_width = config.patch_volume * config.out_channels
        out["final layer and loss"] = s_res * b * c * (dt.norm + 2 * F32 + dt.hidden) + s_full * b * out_width * (
            dt.compute + 3 * F32
        )
    return out


def backward_working_set(config: DiTConfig, sample: Sample, lay: Layout, dt: Dtypes) -> float:
    """Activation gradients alive beyond the saved tensors while one layer runs backward: an
    [S/CP, B, F/TP] gradient of the MLP (compute dtype) and a float32 residual-stream gradient;
    with unfused attention, one attention's score gradient ([B, h/TP, S/CP, S] float32)."""
    c, f, h = config.hidden_size, config.mlp_hidden_size, config.num_heads
    s_full = padded_length(sample.tokens, tp=lay.tp, sp=lay.sp, cp=lay.cp)
    s_cp = s_full // lay.cp
    s_res = s_cp // lay.tp if lay.sp else s_cp
    b = lay.micro_batch
    work = s_cp * b * (f // lay.tp) * dt.compute + s_res * b * c * F32
    if lay.attention == "megatron":
        work += s_cp * b * (h // lay.tp) * s_full * F32
    return work


def sp_gather_buffer(config: DiTConfig, sample: Sample, lay: Layout, dt: Dtypes) -> float:
    """megatron's global all-gather buffer of sequence-parallel linears (kept once allocated): the
    largest gathered input, [S/CP, B, C] in the norm dtype (the modulated LN output)."""
    if not lay.sp:
        return 0.0
    s_cp = padded_length(sample.tokens, tp=lay.tp, sp=lay.sp, cp=lay.cp) // lay.cp
    return s_cp * lay.micro_batch * config.hidden_size * dt.norm


# --- the estimate -------------------------------------------------------------------------------


@dataclasses.dataclass
class Estimate:
    """Bytes on the GPU that holds the most (one pipeline stage)."""

    stage: int
    parameters: int  # on this rank
    state: dict[str, float]
    activations: dict[str, float]

    @property
    def state_total(self) -> float:
        return sum(self.state.values())

    @property
    def activation_total(self) -> float:
        return sum(self.activations.values())

    @property
    def total(self) -> float:
        return self.state_total + self.activation_total

    def dominant(self, n: int = 3) -> list[tuple[str, float]]:
        both = {**self.state, **self.activations}
        return sorted(both.items(), key=lambda kv: -kv[1])[:n]


def estimate(
    config: DiTConfig,
    sample: Sample,
    lay: Layout,
    *,
    data_parallel: int,
    micro_batches: int,
    dtypes: Dtypes,
    state: StateBytes,
) -> Estimate:
    """Per-GPU bytes at the peak of a step, on the pipeline stage that holds the most.

    `data_parallel` shards the distributed optimizer (with CP: over DP × CP); `micro_batches` per
    step bounds the micro-batches in flight under PP."""
    layers = config.depth // lay.pp
    parts = layer_activations(config, sample, lay, dtypes)
    one_layer = sum(parts.values())
    kept_per_layer = kept_activations(parts, lay.recompute)
    s_res = padded_length(sample.tokens, tp=lay.tp, sp=lay.sp, cp=lay.cp) // lay.cp
    s_res = s_res // lay.tp if lay.sp else s_res
    layer_input = s_res * lay.micro_batch * config.hidden_size * dtypes.hidden
    best = None
    for stage in sorted({0, lay.pp - 1}):
        in_flight = min(lay.pp - stage, micro_batches) if lay.pp > 1 else 1
        params = stage_parameters(config, lay.tp, lay.pp, stage)
        st = {
            "weights + grads (every rank)": params * state.replicated,
            "optimizer + EMA (sharded over DP×CP)": params * state.sharded / (data_parallel * lay.cp),
        }
        act: dict[str, float] = {}
        if lay.recompute == "full":
            # The peak is at the first layer to run backward (every input still kept) or, in a
            # shallow stage, at the last: one input kept and the gradient on its way into the
            # embedders (about three more tensors of that size).
            kept = max(in_flight * layers, 1 + EMBEDDER_GRADIENTS)
            act["layer inputs kept (full recompute)"] = kept * layer_input
            act["one layer recomputed in backward"] = one_layer
        else:
            for name, v in parts.items():
                kept = kept_activations({name: v}, lay.recompute)
                if kept:
                    act[f"layers: {name}"] = in_flight * layers * kept
            if lay.recompute == "selective":
                act["one core attention recomputed"] = one_layer - kept_per_layer
        model = model_activations(config, sample, lay, dtypes, last_stage=stage == lay.pp - 1)
        final = model.pop("final layer and loss", 0.0)
        for name, v in model.items():
            act[name] = in_flight * v
        work = backward_working_set(config, sample, lay, dtypes)
        # The final layer's activations are freed once its backward ran, before any layer's.
        if lay.recompute == "full" or work >= final:
            act["backward working set"] = work
        else:
            act["final layer and loss (start of backward)"] = final
        act["sequence-parallel gather buffer"] = sp_gather_buffer(config, sample, lay, dtypes)
        act = {k: v for k, v in act.items() if v}
        e = Estimate(stage=stage, parameters=params, state=st, activations=act)
        if best is None or e.total > best.total:
            best = e
    return best
