"""Golden files in the official MUG-V trainer's on-disk layouts, made once by this script.

A micro MUG-DiT (2 layers, hidden 12, 2 heads of 6, text width 8, 4 caption tokens; 10,596
parameters) with random weights, written the way the official code writes it, by the rules
docs/reference.md §4.6–4.7 record (the MUG-V Megatron-LM training repository at commit 26da251:
`examples/mugv/convertor/mugdit_hf2mcore.py` for the legacy files; the trainer's torch_dist save
through megatron.core's dist_checkpointing, the layer specs of `examples/mugv/mugdit_spec.py`, and
the EMA layout `convertor/ema_restore.py` reads). The rules are written out again here, apart from
mugv/layouts and our writers, so that these files check our readers and writers rather than
repeat them. TP 2 everywhere (each TP rank's file or shards).

    python tests/golden/official/make.py     # rewrites the files next to this script (seeded)

  dit.pt, y_embedding.pt        the release-layout weights (flat {name: float32}, torch.save) and
                                the null caption hf2mcore takes from its fixture
  ema.pt                        the EMA of the torch_dist training checkpoint, release layout
  legacy_te/checkpoints/        `mugdit_hf2mcore.py --tensor-parallel-size 2 --use-te`
  legacy_local/checkpoints/     `mugdit_hf2mcore.py --tensor-parallel-size 2`
  torch_dist_te/checkpoints/    a training checkpoint of the TE-spec trainer, iteration 3
  torch_dist_local/checkpoints/ the local-spec trainer's re-save of a legacy checkpoint
                                (`torch2dist`), iteration 1: no optimizer state

The rules:
* Names: `blocks.{i}.` → `decoder.layers.{i}.` with the sub-names of §4.6; `t_embedder` →
  `timestep_embedder`, `t_block` → `timestep_block`, `y_embedder.y_proj` →
  `context_embedder.proj`, the null caption → `context_embedder.drop_emb`, scale-shift tables
  gain `.bias`.
* `attn.qkv` rows (n, head, c) become (head, n, c) ("(n nh c) → (nh n c)"), `kv_linear` likewise
  with n ∈ {k, v}; then column-parallel tensors (qkv, q, kv, fc1, weights and biases) are cut in
  TP contiguous pieces along dim 0, row-parallel weights (both attention projections, fc2) along
  dim 1, the rest copied to each rank.
* hf2mcore: `{"model": {...}}` only, float32, `decoder.layers.{i}.` keys, the null caption always
  written (from the fixture when the weights have none), with `--use-te` an `_extra_state: None`
  for every linear_qkv, linear_q, linear_kv, linear_proj, linear_fc1, linear_fc2 and
  scale_shift_table (the final layer's too); tracker "1", `iter_0000001/mp_rank_0{r}/`.
* torch_dist: model weights bf16, a layer's tensor stacked as `decoder.layers.<sub>` [L, …] at
  offset (layer, …) plus the TP offset; `_extra_state` objects keyed `decoder.layers.<module>.
  _extra_state` of shape (L,) at (layer,) (the final layer's (1,) at (0,)): TE 2's pickled-None
  byte tensor for TE modules, None for the ScaleShiftTable; which modules: the TE spec's
  linears, core attentions and q/k RMSNorms (TENorm) and the scale-shift tables, the local
  spec's core attentions (TE's in both specs) and scale-shift tables; `rng_state` a one-element
  list per (PP, TP) rank; common.pt with Megatron-LM's `args` (megatron.core enums included),
  `checkpoint_version` 3.0, `iteration`, the scheduler state and the content metadata.
* The training checkpoint's optimizer state (`fully_sharded_model_space`; here only the EMA): per
  parameter `optimizer.state.{exp_moving_avg,exp_avg,exp_avg_sq,fp32_param}.<key>`, float32, each rank's
  shard flattened: [L, shards along each axis of a layer's tensor, shard numel] (so [L, 2, 1, n]
  for a column-parallel weight, [L, 1, 2, n] for a row-parallel one, [L, 1, 1, n] replicated,
  [L, 2 or 1, n] for a layer's vector, [1, …, 1, numel] outside the layers, a 1-D tensor outside
  the layers as it is).
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import shutil
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TP = 2
# depth, hidden, heads, text width, caption tokens, sinusoid width; in 24, out 48, patch (1, 2, 2), MLP 4×.
L, C, H, D_TEXT, N_TEXT, FREQ = 2, 12, 2, 8, 4, 8
HEAD = C // H
F = 4 * C
TE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "self_attention.q_layernorm",
    "self_attention.k_layernorm",
    "cross_attention.linear_q",
    "cross_attention.linear_kv",
    "cross_attention.core_attention",
    "cross_attention.linear_proj",
    "cross_attention.q_layernorm",
    "cross_attention.k_layernorm",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
    "scale_shift_table",
)
LOCAL_MODULES = ("self_attention.core_attention", "cross_attention.core_attention", "scale_shift_table")
HF2MCORE_TE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "cross_attention.linear_q",
    "cross_attention.linear_kv",
    "cross_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
    "scale_shift_table",
)
BLOCK = {
    "scale_shift_table": "scale_shift_table.bias",
    "attn.qkv.weight": "self_attention.linear_qkv.weight",
    "attn.qkv.bias": "self_attention.linear_qkv.bias",
    "attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "attn.proj.weight": "self_attention.linear_proj.weight",
    "attn.proj.bias": "self_attention.linear_proj.bias",
    "cross_attn_norm.weight": "pre_cross_attn_layernorm.weight",
    "cross_attn_norm.bias": "pre_cross_attn_layernorm.bias",
    "cross_attn.q_linear.weight": "cross_attention.linear_q.weight",
    "cross_attn.q_linear.bias": "cross_attention.linear_q.bias",
    "cross_attn.kv_linear.weight": "cross_attention.linear_kv.weight",
    "cross_attn.kv_linear.bias": "cross_attention.linear_kv.bias",
    "cross_attn.q_norm.weight": "cross_attention.q_layernorm.weight",
    "cross_attn.k_norm.weight": "cross_attention.k_layernorm.weight",
    "cross_attn.proj.weight": "cross_attention.linear_proj.weight",
    "cross_attn.proj.bias": "cross_attention.linear_proj.bias",
    "mlp.fc1.weight": "mlp.linear_fc1.weight",
    "mlp.fc1.bias": "mlp.linear_fc1.bias",
    "mlp.fc2.weight": "mlp.linear_fc2.weight",
    "mlp.fc2.bias": "mlp.linear_fc2.bias",
}
COLUMN = ("linear_qkv.", "linear_q.", "linear_kv.", "linear_fc1.")
ROW = ("linear_proj.weight", "linear_fc2.weight")
INTERLEAVED = {"self_attention.linear_qkv": 3, "cross_attention.linear_kv": 2}


def release_shapes() -> dict[str, tuple]:
    """The release state dict of the micro model (names and shapes, in dit.pt's order)."""
    s = {
        "start_token": (C,),
        "end_token": (C,),
        "x_embedder.proj.weight": (C, 24, 1, 2, 2),
        "x_embedder.proj.bias": (C,),
    }
    for e in ("t_embedder", "fps_embedder"):
        s.update(
            {
                f"{e}.mlp.0.weight": (C, FREQ),
                f"{e}.mlp.0.bias": (C,),
                f"{e}.mlp.2.weight": (C, C),
                f"{e}.mlp.2.bias": (C,),
            }
        )
    s.update({"t_block.1.weight": (6 * C, C), "t_block.1.bias": (6 * C,)})
    s.update({"y_embedder.y_proj.fc1.weight": (C, D_TEXT), "y_embedder.y_proj.fc1.bias": (C,)})
    s.update({"y_embedder.y_proj.fc2.weight": (C, C), "y_embedder.y_proj.fc2.bias": (C,)})
    block = {
        "scale_shift_table": (6, C),
        "attn.qkv.weight": (3 * C, C),
        "attn.qkv.bias": (3 * C,),
        "attn.q_norm.weight": (HEAD,),
        "attn.k_norm.weight": (HEAD,),
        "attn.proj.weight": (C, C),
        "attn.proj.bias": (C,),
        "cross_attn_norm.weight": (C,),
        "cross_attn_norm.bias": (C,),
        "cross_attn.q_linear.weight": (C, C),
        "cross_attn.q_linear.bias": (C,),
        "cross_attn.kv_linear.weight": (2 * C, C),
        "cross_attn.kv_linear.bias": (2 * C,),
        "cross_attn.q_norm.weight": (HEAD,),
        "cross_attn.k_norm.weight": (HEAD,),
        "cross_attn.proj.weight": (C, C),
        "cross_attn.proj.bias": (C,),
        "mlp.fc1.weight": (F, C),
        "mlp.fc1.bias": (F,),
        "mlp.fc2.weight": (C, F),
        "mlp.fc2.bias": (C,),
    }
    for i in range(L):
        s.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    s.update({"final_layer.scale_shift_table": (2, C), "final_layer.linear.weight": (192, C)})
    s["final_layer.linear.bias"] = (192,)
    return s


def megatron_name(name: str) -> str:
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m:
        return f"decoder.layers.{m.group(1)}.{BLOCK[m.group(2)]}"
    for a, b in (
        ("t_embedder.", "timestep_embedder."),
        ("t_block.", "timestep_block."),
        ("y_embedder.y_proj.", "context_embedder.proj."),
    ):
        if name.startswith(a):
            return b + name[len(a) :]
    return name + ".bias" if name == "final_layer.scale_shift_table" else name


def interleave(t: torch.Tensor, n: int) -> torch.Tensor:
    """HF rows (n, head, c) → Megatron rows (head, n, c) on dim 0."""
    rest = t.shape[1:]
    return t.reshape(n, H, HEAD, *rest).transpose(0, 1).reshape(n * H * HEAD, *rest)


def split_axis(mname: str) -> int | None:
    sub = mname.split("decoder.layers.", 1)[-1]
    sub = re.sub(r"^\d+\.", "", sub)
    if any(
        sub.startswith(f"self_attention.{p}") or sub.startswith(f"cross_attention.{p}") or sub.startswith(f"mlp.{p}")
        for p in COLUMN
    ):
        return 0
    if any(sub.endswith(p) for p in ROW):
        return 1
    return None


def megatron_full(release: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in release.items():
        mname = megatron_name(name)
        module = re.sub(r"^decoder\.layers\.\d+\.", "", mname).rsplit(".", 1)[0]
        out[mname] = interleave(t, INTERLEAVED[module]) if module in INTERLEAVED else t
    return out


def shard(mname: str, t: torch.Tensor, rank: int) -> torch.Tensor:
    axis = split_axis(mname)
    return t if axis is None else torch.chunk(t, TP, dim=axis)[rank].contiguous()


# --- hf2mcore --------------------------------------------------------------------------------


def write_hf2mcore(out: str, release: dict, y_embedding: torch.Tensor, use_te: bool) -> None:
    full = megatron_full(release)
    full["context_embedder.drop_emb"] = y_embedding
    root = os.path.join(out, "checkpoints")
    for r in range(TP):
        model = {k: shard(k, v, r).float().clone() for k, v in full.items()}
        if use_te:
            for i in range(L):
                for m in HF2MCORE_TE_MODULES:
                    model[f"decoder.layers.{i}.{m}._extra_state"] = None
            model["final_layer.scale_shift_table._extra_state"] = None
        d = os.path.join(root, "iter_0000001", f"mp_rank_0{r}")
        os.makedirs(d)
        torch.save({"model": model}, os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")


# --- torch_dist, written by the two TP ranks -------------------------------------------------


def flattened_shape(mname: str, full_shape: tuple) -> tuple[tuple, tuple]:
    """(reformulated global shape, shards per axis of a layer's tensor) of a parameter's
    fully_sharded_model_space optimizer state (full_shape: one layer's, or the whole tensor)."""
    frags = [1] * len(full_shape)
    axis = split_axis(mname)
    if axis is not None:
        frags[axis] = TP
    local = int(np.prod([d // f for d, f in zip(full_shape, frags)]))
    stacked = mname.startswith("decoder.layers.")
    if not stacked and len(full_shape) == 1:
        return tuple(full_shape), tuple(frags)
    return ((L,) if stacked else ()) + tuple(frags) + (local,), tuple(frags)


def sharded_entries(rank: int, full: dict, states: dict, spec: str, training: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    sd = {}
    for mname, t in full.items():
        m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", mname)
        layer, key = (int(m.group(1)), f"decoder.layers.{m.group(2)}") if m else (None, mname)
        axis = split_axis(mname)
        local = shard(mname, t, rank).to(torch.bfloat16)
        offsets, prepend = ([(0, layer, L)], 1) if layer is not None else ([], 0)
        if axis is not None:
            offsets.append((axis + prepend, rank, TP))
        replica = (0, 0 if axis is not None else rank, 0)
        sd[mname] = ShardedTensor.from_rank_offsets(key, local, *offsets, replica_id=replica, prepend_axis_num=prepend)
        if not training or mname == "context_embedder.drop_emb":  # a buffer: no optimizer state
            continue
        global_shape, frags = flattened_shape(mname, tuple(t.shape))
        piece = [0] * len(frags)
        if axis is not None:
            piece[axis] = rank
        for state, values in states.items():
            data = shard(mname, values[mname], rank).float().reshape(-1)
            if layer is not None:
                data = data.reshape((1,) + (1,) * len(frags) + (-1,))
                offs = [(0, layer, L)] + [(1 + a, piece[a], frags[a]) for a in range(len(frags)) if frags[a] > 1]
            elif len(global_shape) == 1:
                offs = []
            else:
                data = data.reshape((1,) * len(frags) + (-1,))
                offs = [(a, piece[a], frags[a]) for a in range(len(frags)) if frags[a] > 1]
            sd[f"{state}.{mname}"] = ShardedTensor.from_rank_offsets(
                f"optimizer.state.{state}.{key}", data, *offs, replica_id=(0, 0 if axis is not None else rank, 0)
            )
    te_none = torch.frombuffer(bytearray(pickle.dumps(None)), dtype=torch.uint8)
    for i in range(L):
        for module in TE_MODULES if spec == "te" else LOCAL_MODULES:
            key = f"decoder.layers.{module}._extra_state"
            value = None if module == "scale_shift_table" else te_none.clone()
            sd[f"{key}/{i}"] = ShardedObject(key, value, (L,), (i,), replica_id=(0, rank, 0))
    key = "final_layer.scale_shift_table._extra_state"
    sd[key] = ShardedObject(key, None, (1,), (0,), replica_id=(0, rank, 0))
    rng = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
        "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)},
    }
    sd["rng_state"] = ShardedObject("rng_state", [rng], (1, TP), (0, rank), replica_id=0)
    return sd


def megatron_lm_common(iteration: int, training: bool) -> dict:
    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(
        tensor_model_parallel_size=TP,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        data_parallel_size=1,
        world_size=TP,
        num_layers=L,
        hidden_size=C,
        num_attention_heads=H,
        kv_channels=HEAD,
        ffn_hidden_size=F,
        ckpt_format="torch_dist",
        attention_backend=AttnBackend.auto,
        params_dtype=torch.bfloat16,
        bf16=True,
        vision_model_type="mugdit_debug",
        caption_dropout_prob=0.1,
        consumed_train_samples=iteration * TP,
    )
    common = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "num_floating_point_operations_so_far": 0,
        "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True},
    }
    if training:
        common["opt_param_scheduler"] = {"max_lr": 1e-5, "min_lr": 1e-5, "num_steps": iteration, "lr_warmup_steps": 100}
        common["optimizer"] = {"param_state_sharding_type": "fully_sharded_model_space"}
    return common


def _rank(rank: int, port: int, out: str, spec: str, iteration: int, training: bool) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if not torch.cuda.is_available():
        # megatron's writer synchronises CUDA; on a CPU machine there is nothing to wait for.
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: torch.device("cpu")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    data = torch.load(os.path.join(HERE, "_parts.pt"), weights_only=False)
    full = megatron_full(data["release"])
    full["context_embedder.drop_emb"] = data["y_embedding"]
    states = {}
    if training:
        for state, release in data["states"].items():
            states[state] = megatron_full(release)
    sd = sharded_entries(rank, full, states, spec, training)
    sd.update(megatron_lm_common(iteration, training))
    iter_dir = os.path.join(out, "checkpoints", f"iter_{iteration:07d}")
    if rank == 0:
        os.makedirs(iter_dir)
    torch.distributed.barrier()
    dist_checkpointing.save(
        sd, iter_dir, sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    )
    if rank == 0:
        with open(os.path.join(out, "checkpoints", "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    rng = np.random.default_rng(2026)
    shapes = release_shapes()
    release = {n: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for n, s in shapes.items()}
    y_embedding = torch.from_numpy(rng.standard_normal((N_TEXT, D_TEXT)).astype(np.float32))
    # The training checkpoint's optimizer state: only the EMA, to keep the files small (Adam's
    # exp_avg, exp_avg_sq and fp32_param sit beside it under the same rules; readers skip them).
    states = {
        "exp_moving_avg": {n: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for n, s in shapes.items()},
    }
    for name in ("legacy_te", "legacy_local", "torch_dist_te", "torch_dist_local"):
        shutil.rmtree(os.path.join(HERE, name), ignore_errors=True)
    torch.save(release, os.path.join(HERE, "dit.pt"))
    torch.save(y_embedding, os.path.join(HERE, "y_embedding.pt"))
    torch.save(states["exp_moving_avg"], os.path.join(HERE, "ema.pt"))
    write_hf2mcore(os.path.join(HERE, "legacy_te"), release, y_embedding, use_te=True)
    write_hf2mcore(os.path.join(HERE, "legacy_local"), release, y_embedding, use_te=False)
    parts = os.path.join(HERE, "_parts.pt")
    torch.save({"release": release, "y_embedding": y_embedding, "states": states}, parts)
    try:
        for name, spec, iteration, training in (
            ("torch_dist_te", "te", 3, True),
            ("torch_dist_local", "local", 1, False),
        ):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_rank, args=(port, os.path.join(HERE, name), spec, iteration, training), nprocs=TP, join=True)
    finally:
        os.remove(parts)


if __name__ == "__main__":
    sys.exit(main())
