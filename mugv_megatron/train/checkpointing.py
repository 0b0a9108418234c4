"""torch_dist training checkpoints of the Megatron trainer (megatron.core.dist_checkpointing).

Layout (names and key scheme: mugv/io/megatron.py and mugv/io/torch_dist.py, whose reader the
converters and `init_from` read the weights with):
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
                                             ema_restore.py expects, docs/reference.md §4.7)
  context_embedder.drop_emb                  the null caption for dropped captions (not trained)
  optimizer.state.reference_model.<key>      preference runs: the frozen reference weights
  rng_state                                  torch RNG states, one object per rank
common.pt: iteration, checkpoint_version, and `mugv`: model config, trainer counters (step,
consecutive non-finite, skipped), optimizer kind and update count, data-iterator state.

With megatron's DistributedOptimizer (ZeRO-1: main weights and moments split over DP in
flat bucket ranges) each rank's ranges are gathered into whole per-parameter tensors and written
under the same names and sharding as the torch-AdamW path's, plus the fp32 main weights:
`optimizer.state.exp_avg.<key>`, `optimizer.state.exp_avg_sq.<key>`,
`optimizer.state.param.<key>` (with bf16 parameters the model entries are bf16, as in the
reference's checkpoints, and these are the exact weights) and the EMA of the main weights,
`optimizer.state.exp_moving_avg.<key>`. On load each rank takes its ranges back out, so the
checkpoint reshards over DP, TP and PP. We do not use the optimizer's own `sharded_state_dict`:
in megatron.core 0.16.1 `fully_sharded_model_space` is deprecated (its flattened ShardedTensors
are no longer accepted), `dp_reshardable` only reshards over DP and stores bucket layouts, and
`fully_reshardable` indexes its gathered buffer, from which the end-of-bucket padding was
removed, with padded offsets: with more than one bucket (overlap_grad_reduce's 40M-element
buckets) it writes and reads shifted elements ("param range exceeds unpadded buffer").

A checkpoint is written to `iter_XXXXXXX.tmp`, its digest table (mugv.io.torch_dist,
`mugv_digests.json`: every file, each tensor chunk of the `.distcp` files; the ranks share the
reading) recorded, renamed when complete, and only then named in the tracker (also written to a
temporary file and renamed), so a crash never leaves a partial checkpoint that looks complete.
A resume checks the newest checkpoint against its table before loading it: changed bytes are
named (file and tensor) in a prominent warning, the checkpoint is moved aside
(`iter_XXXXXXX.unreadable-<time>`, never deleted) and the previous one is used; a readable
checkpoint of another model or optimizer is refused (`IncompatibleCheckpoint`). Rotation keeps
`keep` iterations and deletes older ones only once the new save is published with its table,
and only iterations that carry one (those mugv wrote). `save(..., async_save=True)` returns once the state is staged in
host memory (a forked writer per rank then writes it); the rename and the tracker update run in
the save's finalize step, on every rank once all writers are done, from `finalize_async()` (the
train loop calls it each step; the next save and the end of the run call it blocking). A run
killed before its finalize leaves only the `.tmp` directory, which restore never picks and the
next save removes.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings

import torch
import torch.distributed as dist

from mugv import lora as lora_lib
from mugv.io import digest, torch_dist
from mugv.io.atomic import quarantine
from mugv.io.megatron import PARTIAL_SUFFIX, Layout, common_state, is_partial_iter_dir, iter_dir, write_tracker
from mugv.io.megatron import iterations as steps
from mugv.io.megatron import megatron_lm_args as args_for
from mugv.io.mismatch import IncompatibleCheckpoint, check_lora
from mugv.io.torch_dist import (
    EMA_PREFIX,
    NULL_TEXT_KEY,
    REFERENCE_PREFIX,
    RNG_KEY,
    extra_state_objects,
    optimizer_prefix,
    stored_key,
)
from mugv.layouts import megatron as layout
from mugv.run import preemption

log = logging.getLogger(__name__)


def _parallel():
    from megatron.core import parallel_state as ps

    # Context-parallel ranks hold replicas of everything, like data-parallel ones.
    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_rank(with_context_parallel=True),
        ps.get_pipeline_model_parallel_rank(),
    )


def stage_replicated(name: str) -> bool:
    """Held by every pipeline stage (the embedders and special tokens): only the first stage's
    copy is the main replica. Layers are split over the stages, the final layer is on the last."""
    return not name.startswith((layout.LAYER_PREFIX, "final_layer."))


def sharded_tensor(name: str, tensor: torch.Tensor, depth: int, prefix: str = "", layer_offset: int = 0):
    """The ShardedTensor of this rank's shard of Megatron tensor `name` (TP split by the
    converters' rule; layers stacked along a prepended axis at their global index, the stage's
    `layer_offset` plus the local one, so a checkpoint loads under any PP size; `data` is `tensor`
    itself: saved from, or loaded into)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp_rank, tp, dp_rank, pp_rank = _parallel()
    key, layer = stored_key(name, prefix)
    offsets, prepend = [], 0
    if layer is not None:
        prepend, index = 1, layer_offset + layer
        if not 0 <= index < depth:
            raise ValueError(f"{name}: layer {index} (offset {layer_offset}) outside the model's {depth} layers")
        offsets.append((0, index, depth))
    rule = layout.tp_split_rule(name)
    if rule != "replicated" and tp > 1:
        offsets.append(((0 if rule == "column" else 1) + prepend, tp_rank, tp))
    replica = (tp_rank if rule == "replicated" else 0, pp_rank if stage_replicated(name) else 0, dp_rank)
    return ShardedTensor.from_rank_offsets(key, tensor, *offsets, replica_id=replica, prepend_axis_num=prepend)


def layer_offset(model) -> int:
    """Global index of the stage's first layer (0 without pipeline parallelism)."""
    return int(getattr(model.decoder, "layer_offset", 0))


def _state_dict(trainer, *, loading: bool) -> dict:
    """The sharded state dict to save, or (loading) to load into: then the targets are fresh
    tensors, so that a checkpoint failing half-way leaves the trainer untouched."""
    depth = trainer.model_config.depth
    off = layer_offset(trainer.module)
    opt = trainer.optimizer
    fresh = (lambda t: t.detach().clone()) if loading else (lambda t: t)
    model_sd = {
        n: sharded_tensor(n, fresh(p.data), depth, layer_offset=off) for n, p in trainer.module.named_parameters()
    }
    sd: dict = {"model": model_sd}
    if opt.kind == "torch_adamw":
        ema = {n: fresh(t) for n, t in trainer.ema.full_state().items()}
    elif loading:
        ema = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in trainer.module.named_parameters()}
    else:
        ema = trainer.ema.full_state()
    sd["ema"] = {n: sharded_tensor(n, t, depth, EMA_PREFIX, off) for n, t in ema.items()}
    if opt.kind == "torch_adamw":
        # Frozen weights (LoRA's base, config.freeze) have no optimizer state.
        states = {
            n: {k: fresh(t) for k, t in opt.moments(p).items()}
            for n, p in trainer.module.named_parameters()
            if p.requires_grad
        }
    elif loading:
        states = {
            n: {k: torch.zeros(p.shape, dtype=torch.float32) for k in opt.STATE_KEYS}
            for n, p in trainer.module.named_parameters()
        }
    else:
        states = opt.full_states()
    sd["optimizer"] = {
        f"{kind}.{n}": sharded_tensor(n, t, depth, optimizer_prefix(kind), off)
        for n, per in states.items()
        for kind, t in per.items()
    }
    if getattr(trainer, "ref", None) is not None:
        # Preference runs: the frozen reference model (the weights the run started from).
        sd["ref"] = {n: sharded_tensor(n, fresh(t), depth, REFERENCE_PREFIX, off) for n, t in trainer.ref.items()}
    sd["null_text"] = sharded_tensor(NULL_TEXT_KEY, fresh(trainer.null_text), depth)
    sd["rng_state"] = _rng_object(None if loading else rng_states())
    return sd


def rng_states() -> dict:
    """This process's generator states, as Megatron-LM's `get_rng_state` collects them (python,
    numpy, torch CPU; with CUDA the CUDA generator and megatron's model-parallel tracker)."""
    import random

    import numpy as np

    rng = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        rng["cuda_rng_state"] = torch.cuda.get_rng_state()
        rng["rng_tracker_states"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return rng


def rng_complete(rng: dict) -> bool:
    """Whether Megatron-LM can restore these states (it needs the CUDA ones and a non-empty tracker)."""
    return "cuda_rng_state" in rng and bool(rng.get("rng_tracker_states"))


def _rng_object(rng: dict | None):
    """Megatron-LM's `rng_state` entry: a one-element list per (PP, TP) rank, the DP/CP ranks
    replicas of it (so a checkpoint's states apply when the TP and PP sizes match)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    tp_rank, tp, dp_rank, pp_rank = _parallel()
    pp = ps.get_pipeline_model_parallel_world_size()
    return ShardedObject(RNG_KEY, None if rng is None else [rng], (pp, tp), (pp_rank, tp_rank), replica_id=dp_rank)


def _extra_states(trainer) -> dict:
    """The TE `_extra_state` placeholders of this stage's layers (and the final layer on the last
    stage) that Megatron-LM's load of the official model asks for (mugv.io.torch_dist)."""
    tp_rank, _, dp_rank, _ = _parallel()
    off, count = layer_offset(trainer.module), len(trainer.module.decoder.layers)
    return extra_state_objects(
        trainer.model_config.depth,
        range(off, off + count),
        final_layer=bool(getattr(trainer.module, "post_process", True)),
        replica_id=(0, tp_rank, dp_rank),
    )


def megatron_lm_args(trainer, step: int, rng: dict):
    """Megatron-LM's `args` for this run's checkpoint (mugv.io.megatron.megatron_lm_args)."""
    from megatron.core import parallel_state as ps

    layout = Layout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        sequence_parallel=bool(getattr(trainer.module.config, "sequence_parallel", False)),
    )
    return args_for(trainer.model_config, step, layout, rng_saved=rng_complete(rng), seed=trainer.seed)


_ASYNC_QUEUE = None


def _async_queue():
    global _ASYNC_QUEUE
    if _ASYNC_QUEUE is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        # One forked writer per save: it sees the state as it was when forked, so training
        # may change the weights in place while it writes.
        _ASYNC_QUEUE = AsyncCallsQueue(persistent=False)
    return _ASYNC_QUEUE


def pending_saves() -> int:
    """Async saves scheduled and not yet published (this process)."""
    return 0 if _ASYNC_QUEUE is None else _ASYNC_QUEUE.get_num_unfinalized_calls()


def finalize_async(blocking: bool = False) -> int:
    """Publish the async saves whose writers are done on every rank (all of them, waiting, with
    blocking=True); returns how many were published. Collective: call on every rank."""
    if not pending_saves():
        return 0
    return len(_async_queue().maybe_finalize_async_calls(blocking=blocking))


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _publish(directory: str, step: int, keep: int) -> None:
    """Record the digest table of the complete `iter_XXXXXXX.tmp` (each rank reads its share of
    the files), rename it, name it in the tracker, rotate old ones."""
    dist.barrier()
    final = iter_dir(directory, step)
    tmp = final + PARTIAL_SUFFIX
    rank, world = dist.get_rank(), dist.get_world_size()
    files = torch_dist.digest_files(tmp)
    tables = _gather(torch_dist.compute_digests(tmp, files[rank::world]))
    if rank == 0:
        torch_dist.write_digests(tmp, digest.merge(tables))
        if os.path.exists(final):
            # Skipped as unreadable by this run's resume (or another's): kept aside, not deleted.
            log.warning("moved %s aside to %s: this save takes its name", final, quarantine(final))
        os.replace(tmp, final)
        write_tracker(directory, step)
        _rotate(directory, step, keep)
    dist.barrier()


def _rotate(directory: str, newest: int, keep: int) -> None:
    """Delete iterations older than the `keep` newest, once `newest` is published with every file
    its table names; only iterations with a digest table (mugv wrote them) are deleted."""
    if keep <= 0:
        return
    found = torch_dist.verify(iter_dir(directory, newest), files_only=True)
    if found is None or not found.ok:
        log.error(
            "not rotating checkpoints: the new save %s does not match its digest table (%s)",
            iter_dir(directory, newest),
            "no table" if found is None else "; ".join(found.problems[:3]),
        )
        return
    for old in steps(directory)[:-keep]:
        path = iter_dir(directory, old)
        if os.path.isfile(os.path.join(path, torch_dist.DIGESTS_FILE)):
            shutil.rmtree(path, ignore_errors=True)
        else:
            log.info("rotation leaves %s: it has no digest table (not written by this version of mugv)", path)


_WRITER_HELPER = None


def _shield_writer_helper() -> None:
    """megatron's torch_dist writer reports each save's results through a queue served by a
    spawned multiprocessing manager, made on the first save and kept. In the trainer's process
    group it died of the group's SIGTERM (what Slurm, timeout and Kubernetes send) before the
    save that SIGTERM asks for, which then failed with BrokenPipeError. Made here instead, it
    ignores SIGTERM and dies with the trainer."""
    global _WRITER_HELPER
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _WRITER_HELPER is not None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    with preemption.helpers_ignore_sigterm():
        manager.start(preemption.helper_init)
    _WRITER_HELPER = manager
    filesystem_async._results_queue = manager.Queue()


def save(
    directory: str,
    trainer,
    data_state: dict,
    run_config: dict | None = None,
    keep: int = 3,
    *,
    async_save: bool = False,
) -> str:
    """Write the trainer's full state at its current step; returns the iteration directory
    (published on return, or, with async_save, by a later `finalize_async`)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    # One save in flight: the previous one is published (or has failed) before this starts.
    finalize_async(blocking=True)
    step = trainer.step
    final = iter_dir(directory, step)
    tmp = final + PARTIAL_SUFFIX
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        # Left by a run killed before its save was finalized (or by a failed write).
        for name in os.listdir(directory):
            if is_partial_iter_dir(name):
                shutil.rmtree(os.path.join(directory, name))
        os.makedirs(tmp)
    dist.barrier()
    trainer.sync_params()
    sd = _state_dict(trainer, loading=False)
    sd.update(_extra_states(trainer))
    sd.update(common_state(trainer.model_config, step, megatron_lm_args(trainer, step, sd["rng_state"].data[0])))
    sd["mugv"].update(
        trainer=trainer.counters(),
        optimizer={"kind": trainer.optimizer.kind, "count": trainer.optimizer.count},
        data=dict(data_state),
        config=run_config or {},
    )
    # One writer thread per rank: CPU tests share two cores. (The writer reports through a
    # spawn-context multiprocessing manager: a script calling this needs a __main__ guard.)
    _shield_writer_helper()
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        request = dist_checkpointing.save(sd, tmp, sharded_strategy=strategy, async_sharded_save=async_save)
    if not async_save:
        _publish(directory, step, keep)
        return final
    request.add_finalize_fn(functools.partial(_publish, directory, step, keep))
    _async_queue().schedule_async_request(request)
    return final


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
        raise IncompatibleCheckpoint(path, "model", saved_cfg, trainer.model_config.to_dict())
    counters = meta.get("trainer", {})
    missing = {"step", "nonfinite", "skipped", "seed"} - set(counters)
    if missing or "count" not in meta.get("optimizer", {}) or "data" not in meta:
        raise ValueError(f"{path}: common.pt lacks trainer counters {sorted(missing)} / optimizer count / data state")
    lora = getattr(trainer, "lora", None) or lora_lib.LoraConfig()
    freeze = getattr(trainer, "freeze", None) or lora_lib.FreezeConfig()
    check_lora(path, meta.get("config"), lora, freeze)
    if meta["optimizer"]["kind"] != trainer.optimizer.kind:
        raise IncompatibleCheckpoint(path, "optimizer", meta["optimizer"]["kind"], trainer.optimizer.kind)
    saved_grid = None
    try:
        from megatron.core.dist_checkpointing import load_sharded_metadata

        saved = load_sharded_metadata(path)
        obj = next((v for k, v in saved.items() if k.startswith(RNG_KEY)), None)
        saved_grid = None if obj is None else tuple(obj.global_shape)
    except Exception:  # noqa: BLE001 - metadata is only used to decide whether RNG can be restored
        saved_grid = None
    if saved_grid != want_rng.global_shape:
        # Another (PP, TP) grid (or a checkpoint from before Megatron-LM's layout): the per-rank
        # RNG states do not map; the step's randomness is derived from (seed, step) anyway, so
        # only unused generator states are lost.
        sd.pop("rng_state")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = dist_checkpointing.load(sd, path)
    with torch.no_grad():
        for n, p in trainer.module.named_parameters():
            p.copy_(loaded["model"][n])
        trainer.ema.load_full_state(loaded["ema"])
        trainer.null_text.copy_(loaded["null_text"])
        for n, t in (loaded.get("ref") or {}).items():
            trainer.ref[n].copy_(t)
    opt = trainer.optimizer
    if opt.kind == "torch_adamw":
        opt.set_count(meta["optimizer"]["count"])
        with torch.no_grad():
            for n, p in trainer.module.named_parameters():
                if not p.requires_grad:
                    continue
                for kind, t in opt.moments(p).items():
                    t.copy_(loaded["optimizer"][f"{kind}.{n}"])
    else:
        opt.load_full_states(
            {
                n: {k: loaded["optimizer"][f"{k}.{n}"] for k in opt.STATE_KEYS}
                for n, _ in trainer.module.named_parameters()
            },
            meta["optimizer"]["count"],
        )
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"][0])
    trainer.set_counters(meta["trainer"])
    return meta


def _restore_rng(rng: dict) -> None:
    import random

    import numpy as np

    random.setstate(rng["random_rng_state"])
    np.random.set_state(rng["np_rng_state"])
    torch.set_rng_state(rng["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in rng:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(rng["cuda_rng_state"])
        if rng.get("rng_tracker_states"):
            tensor_parallel.get_cuda_rng_tracker().set_states(rng["rng_tracker_states"])


def verify(path: str) -> None:
    """Check every byte of an iteration against its digest table, the ranks sharing the reading
    (collective); raises CorruptCheckpoint naming the files and tensors that changed. An
    iteration without a table (written before checksums) is used unverified, with a warning."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        found = torch_dist.verify(path, select=lambda i, rel: i % world == rank)
        problems = None if found is None else found.problems
    except digest.CorruptCheckpoint as e:
        problems = e.problems
    everyone = _gather(problems)
    if all(p is None for p in everyone):
        log.warning("%s has no digest table (%s): resuming from it unverified", path, torch_dist.DIGESTS_FILE)
        return
    bad = [p for ps in everyone for p in (ps or [])]
    if bad:
        raise digest.CorruptCheckpoint(path, bad)


def _loud(path: str, e: BaseException) -> None:
    lines = getattr(e, "problems", None) or (str(e).splitlines()[:1] if str(e) else [])
    log.error(
        "\n%s\nCHECKPOINT UNREADABLE: checkpoint %s is unreadable (%s):\n  %s\nIt is moved aside "
        "(never deleted) and the previous checkpoint is used; this run's next save at that step takes "
        "its place.\n%s",
        "=" * 100,
        path,
        type(e).__name__,
        "\n  ".join(line[:300] for line in lines[:8]),
        "=" * 100,
    )


def restore_latest(directory: str, trainer) -> dict | None:
    """Restore from the newest readable checkpoint under `directory`; None if there is none.

    The newest is first checked against its digest table; one that does not match or does not
    load is reported loudly, moved aside (`iter_XXXXXXX.unreadable-<time>`) and the previous one
    tried. A readable checkpoint of another model or optimizer raises IncompatibleCheckpoint."""
    # torch DCP wraps read errors in a BaseException subclass.
    from torch.distributed.checkpoint.api import CheckpointException

    for step in reversed(steps(directory)):
        path = iter_dir(directory, step)
        try:
            verify(path)
            meta = load(path, trainer)
        except IncompatibleCheckpoint:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any read failure: try the previous
            _loud(path, e)
            dist.barrier()
            if dist.get_rank() == 0:
                log.warning("moved %s aside to %s", path, quarantine(path))
            dist.barrier()
            continue
        return meta
    return None
