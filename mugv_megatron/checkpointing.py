"""torch_dist training checkpoints of the Megatron trainer (megatron.core.dist_checkpointing).

Layout (the converters' `megatron:` reader reads the weights out of it):
  <workdir>/checkpoints/latest_checkpointed_iteration.txt      the newest complete step
  <workdir>/checkpoints/iter_XXXXXXX/{.metadata, *.distcp, common.pt, metadata.json}
Sharded entries (global, un-split shapes; TP shards, pipeline stages and DP/CP replicas are
resolved by dist_checkpointing, so a checkpoint loads under any TP and PP size: a stage writes its
layers at their global index, the embedders every stage holds are written by the first stage):
  <megatron name>                            model weights (fp32 master weights), non-layer tensors
  decoder.layers.<suffix>                    layer weights stacked [depth, …]
  optimizer.state.exp_avg.<key>              Adam first moment, per weight (same key as above)
  optimizer.state.exp_avg_sq.<key>           Adam second moment
  optimizer.state.exp_moving_avg.<key>       EMA of the weights (the name the reference's
                                             ema_restore.py expects, megatron-trainer.md §3.5)
  context_embedder.drop_emb                  the null caption for dropped captions (not trained)
  rng_state                                  torch RNG states, one object per rank
common.pt: iteration, checkpoint_version, and `mugv`: model config, trainer counters (step,
consecutive non-finite, skipped), optimizer kind and update count, data-iterator state.
With megatron's DistributedOptimizer (GPU) the optimizer entries come from its own
`sharded_state_dict` in `fully_sharded_model_space`, which writes the same
`optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<key>` names.

A checkpoint is written to `iter_XXXXXXX.tmp`, renamed when complete, and only then named in
the tracker (also written to a temporary file and renamed), so a crash never leaves a partial
checkpoint that looks complete.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist

from mugv.layouts import megatron as layout

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
NULL_TEXT_KEY = "context_embedder.drop_emb"
_ITER = re.compile(r"^iter_(\d{7})$")
_LAYER = re.compile(r"^" + re.escape(layout.LAYER_PREFIX) + r"(\d+)\.(.+)$")


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint of another model or optimizer: never silently skipped."""


def iter_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"iter_{step:07d}")


def _parallel():
    from megatron.core import parallel_state as ps
    # Context-parallel ranks hold replicas of everything, like data-parallel ones.
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_rank(with_context_parallel=True),
            ps.get_pipeline_model_parallel_rank())


def stage_replicated(name: str) -> bool:
    """Held by every pipeline stage (the embedders and special tokens): only the first stage's
    copy is the main replica. Layers are split over the stages, the final layer is on the last."""
    return not name.startswith((layout.LAYER_PREFIX, "final_layer."))


def sharded_tensor(name: str, tensor: torch.Tensor, depth: int, prefix: str = "",
                   layer_offset: int = 0):
    """The ShardedTensor of this rank's shard of Megatron tensor `name` (TP split by the
    converters' rule; layers stacked along a prepended axis at their global index, the stage's
    `layer_offset` plus the local one, so a checkpoint loads under any PP size; `data` is `tensor`
    itself, which is how megatron's optimizer finds the parameter behind a key)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    tp_rank, tp, dp_rank, pp_rank = _parallel()
    m = _LAYER.match(name)
    offsets, prepend = [], 0
    key = name
    if m:
        key, prepend = layout.LAYER_PREFIX + m.group(2), 1
        index = layer_offset + int(m.group(1))
        if not 0 <= index < depth:
            raise ValueError(f"{name}: layer {index} (offset {layer_offset}) outside the model's "
                             f"{depth} layers")
        offsets.append((0, index, depth))
    rule = layout.tp_split_rule(name)
    if rule != "replicated" and tp > 1:
        offsets.append(((0 if rule == "column" else 1) + prepend, tp_rank, tp))
    replica = (tp_rank if rule == "replicated" else 0,
               pp_rank if stage_replicated(name) else 0, dp_rank)
    return ShardedTensor.from_rank_offsets(prefix + key, tensor, *offsets, replica_id=replica,
                                           prepend_axis_num=prepend)


def layer_offset(model) -> int:
    """Global index of the stage's first layer (0 without pipeline parallelism)."""
    return int(getattr(model.decoder, "layer_offset", 0))


def model_sharded_state_dict(model, depth: int, keep_vars: bool = False) -> dict:
    """keep_vars: the Parameter objects themselves as data (megatron's optimizer maps its state
    to keys through their identity), else their plain tensors (loaded in place)."""
    off = layer_offset(model)
    return {n: sharded_tensor(n, p if keep_vars else p.data, depth, layer_offset=off)
            for n, p in model.named_parameters()}


def _state_dict(trainer, *, loading: bool) -> dict:
    """The sharded state dict to save, or (loading) to load into: then the CPU path's targets
    are fresh copies, so that a checkpoint failing half-way leaves the trainer untouched."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    depth = trainer.model_config.depth
    off = layer_offset(trainer.module)
    opt = trainer.optimizer
    fresh = (lambda t: t.detach().clone()) if loading and opt.kind == "torch_adamw" else (lambda t: t)
    if opt.kind == "torch_adamw":
        model_sd = {n: sharded_tensor(n, fresh(p.data), depth, layer_offset=off)
                    for n, p in trainer.module.named_parameters()}
    else:
        model_sd = model_sharded_state_dict(trainer.module, depth, keep_vars=True)
    sd: dict = {"model": model_sd}
    sd["ema"] = {n: sharded_tensor(n, fresh(t), depth, "optimizer.state.exp_moving_avg.", off)
                 for n, t in trainer.ema.shadow.items()}
    if opt.kind == "torch_adamw":
        moments = {}
        for n, p in trainer.module.named_parameters():
            for kind, t in opt.moments(p).items():
                moments[f"{kind}.{n}"] = sharded_tensor(n, fresh(t), depth, f"optimizer.state.{kind}.", off)
        sd["optimizer"] = moments
    else:
        sd["optimizer"] = opt.opt.sharded_state_dict(
            model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"})
    sd["null_text"] = sharded_tensor(NULL_TEXT_KEY, fresh(trainer.null_text), depth)
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    sd["rng_state"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return sd


def save(directory: str, trainer, data_state: dict, run_config: dict | None = None,
         keep: int = 3) -> str:
    """Write the trainer's full state at its current step; returns the iteration directory."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    step = trainer.step
    final = iter_dir(directory, step)
    tmp = final + ".tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    sd = _state_dict(trainer, loading=False)
    sd["iteration"] = step
    sd["checkpoint_version"] = CHECKPOINT_VERSION
    sd["mugv"] = {"model": trainer.model_config.to_dict(), "trainer": trainer.counters(),
                  "optimizer": {"kind": trainer.optimizer.kind, "count": trainer.optimizer.count},
                  "data": dict(data_state), "config": run_config or {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # One writer thread per rank: CPU tests share two cores. (The writer reports through a
        # spawn-context multiprocessing manager: a script calling this needs a __main__ guard.)
        dist_checkpointing.save(sd, tmp, sharded_strategy=TorchDistSaveShardedStrategy(
            "torch_dist", 1, thread_count=1))
    dist.barrier()
    if rank0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(directory, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(step))
        os.replace(tracker_tmp, os.path.join(directory, TRACKER))
        for old in steps(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(iter_dir(directory, old), ignore_errors=True)
    dist.barrier()
    return final


def steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(directory) if (m := _ITER.match(n)))


def load(path: str, trainer) -> dict:
    """Restore the trainer from one iteration directory; returns the saved `mugv` metadata."""
    from megatron.core import dist_checkpointing
    sd = _state_dict(trainer, loading=True)
    want_rng = sd["rng_state"]
    common = dist_checkpointing.load_common_state_dict(path)
    meta = common.get("mugv") if isinstance(common, dict) else None
    if not meta:
        raise ValueError(f"{path}: not a mugv Megatron training checkpoint (common.pt has no 'mugv')")
    saved_cfg = meta["model"]
    if saved_cfg != trainer.model_config.to_dict():
        raise IncompatibleCheckpoint(f"{path}: checkpoint holds model {saved_cfg}, the run's model is "
                         f"{trainer.model_config.to_dict()}")
    counters = meta.get("trainer", {})
    missing = {"step", "nonfinite", "skipped", "seed"} - set(counters)
    if missing or "count" not in meta.get("optimizer", {}) or "data" not in meta:
        raise ValueError(f"{path}: common.pt lacks trainer counters {sorted(missing)} / optimizer "
                         f"count / data state")
    if meta["optimizer"]["kind"] != trainer.optimizer.kind:
        raise IncompatibleCheckpoint(f"{path}: optimizer state of kind {meta['optimizer']['kind']!r} cannot be "
                         f"resumed with {trainer.optimizer.kind!r}")
    saved_world = None
    try:
        from megatron.core.dist_checkpointing import load_sharded_metadata
        saved = load_sharded_metadata(path)
        obj = next((v for k, v in saved.items() if k.startswith("rng_state")), None)
        saved_world = None if obj is None else tuple(obj.global_shape)
    except Exception:  # noqa: BLE001 - metadata is only used to decide whether RNG can be restored
        saved_world = None
    if saved_world != want_rng.global_shape:
        # Another world size: the per-rank RNG states do not map; the step's randomness is
        # derived from (seed, step) anyway, so only unused torch generator states are lost.
        sd.pop("rng_state")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = dist_checkpointing.load(sd, path)
    with torch.no_grad():
        for n, p in trainer.module.named_parameters():
            p.copy_(loaded["model"][n])
        for n, t in trainer.ema.shadow.items():
            t.copy_(loaded["ema"][n])
        trainer.null_text.copy_(loaded["null_text"])
    opt = trainer.optimizer
    if opt.kind == "torch_adamw":
        opt.set_count(meta["optimizer"]["count"])
        with torch.no_grad():
            for n, p in trainer.module.named_parameters():
                for kind, t in opt.moments(p).items():
                    t.copy_(loaded["optimizer"][f"{kind}.{n}"])
    else:
        opt.opt.load_state_dict(loaded["optimizer"])
        opt.count = int(meta["optimizer"]["count"])
    if "rng_state" in loaded:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    trainer.set_counters(meta["trainer"])
    return meta


def restore_latest(directory: str, trainer) -> dict | None:
    """Restore from the newest readable checkpoint under `directory` (an unreadable one is
    skipped with a warning); None if there is none."""
    # torch DCP wraps read errors in a BaseException subclass.
    from torch.distributed.checkpoint.api import CheckpointException
    for step in reversed(steps(directory)):
        path = iter_dir(directory, step)
        try:
            meta = load(path, trainer)
        except IncompatibleCheckpoint:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any read failure: try the previous
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", path,
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            continue
        return meta
    return None
