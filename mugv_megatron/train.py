"""Train MUG-DiT on Megatron-Core: `python -m mugv_megatron.train --config=configs/tiny.py --workdir=DIR`.

The same configs as `mugv_jax.train` (objective, optim, data, checkpoint/log cadence); the
Megatron section (`config.megatron`: tp, sp, pp, cp, distributed_optimizer, use_te) comes from
`--config=configs/mcore.py:tiny` or is added with its defaults, and the flags `--tp`, `--sp`,
`--pp`, `--cp` override it. One process per GPU under torchrun (launch/megatron_torchrun.sh);
without a launcher it runs as a one-process world (CPU works for the tiny config).
`--workdir` holds checkpoints/ (torch_dist, see mugv_megatron/checkpointing.py), tensorboard/
(event files + metrics.jsonl) and config.json. Re-running the same command resumes from the
newest readable checkpoint; SIGTERM saves at the next step boundary and exits 0.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from mugv import flops as flops_lib
from mugv.config import DiTConfig
from mugv.geometry import num_video_tokens
from mugv.training import dataclass_from as _dataclass_from, model_config_from  # noqa: F401
from mugv_megatron import checkpointing, optim, parallel
from mugv_megatron import objective as obj

log = logging.getLogger("mugv.megatron.train")


class NonFiniteLossError(RuntimeError):
    pass


def _configs_megatron():
    # configs/mcore.py by path (configs/ is not a package).
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mcore.py")
    spec = importlib.util.spec_from_file_location("_mugv_configs_mcore", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def megatron_options(config, overrides: dict | None = None) -> dict:
    """config.megatron (defaults from configs/mcore.py) with non-None overrides applied."""
    opts = dict(_configs_megatron().megatron_section())
    opts.update(dict(config.get("megatron", {}) or {}))
    opts.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in ("tp", "pp", "cp"):
        if int(opts[key]) < 1:
            raise ValueError(f"config.megatron.{key} must be >= 1, got {opts[key]}")
    if opts["sp"] and int(opts["tp"]) < 2:
        raise ValueError("config.megatron.sp (sequence parallel) needs config.megatron.tp >= 2")
    return opts


def init_distributed(tp: int, cp: int = 1, pp: int = 1) -> None:
    """torch.distributed from torchrun's environment (or a one-process world), then megatron's
    parallel state with tensor-, context- and pipeline-parallel sizes `tp`, `cp`, `pp`
    (data parallel = world / (tp·cp·pp))."""
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method="env://",
                                timeout=datetime.timedelta(minutes=30))
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % (tp * cp * pp):
        raise ValueError(f"world size {world} is not divisible by config.megatron.tp={tp} × "
                         f"cp={cp} × pp={pp}")
    parallel.setup(tp, rank=dist.get_rank() if dist.is_initialized() else 0, world_size=world,
                   context_parallel_size=cp, pipeline_parallel_size=pp)


def build_iterator(config, model_cfg: DiTConfig, dp_rank: int, dp_size: int):
    """The data iterator (same sources as the JAX trainer); returns (iterator, returns_local)."""
    d = config.data
    if d.source == "synthetic":
        from mugv_jax import data as data_lib   # numpy only
        buckets = [data_lib.Bucket(*map(int, b)) for b in d.buckets]
        src = data_lib.SyntheticTextToLatent(
            buckets, in_channels=model_cfg.in_channels, text_dim=model_cfg.text_dim,
            text_len=int(d.text_len), num_prompts=int(d.num_prompts), fps=float(d.fps), seed=int(config.seed))
        return data_lib.DataIterator(src), False
    if d.source != "shards":
        raise ValueError(f"config.data.source={d.source!r} is not available (known: 'synthetic', 'shards')")
    from mugv_data.loader import ShardLoader
    if not d.get("path"):
        raise ValueError("config.data.source='shards' needs config.data.path (a prepared dataset directory)")
    # Ranks of one data-parallel replica (its TP group) read the same slice.
    loader = ShardLoader(d.path, int(d.batch_size), text_len=int(d.text_len), seed=int(config.seed),
                         process_index=dp_rank, process_count=dp_size,
                         num_workers=int(d.get("num_workers", 0)))
    if (loader.latent_channels, loader.text_dim) != (model_cfg.in_channels, model_cfg.text_dim):
        raise ValueError(f"dataset {d.path} has {loader.latent_channels} latent channels and text width "
                         f"{loader.text_dim}; model {config.model} expects {model_cfg.in_channels} and "
                         f"{model_cfg.text_dim} (set config.model_overrides.text_dim)")
    return loader, True


def _release_state(spec: str, model_cfg: DiTConfig):
    if not spec:
        return None
    if spec.startswith(("jax:", "megatron:")):
        raise ValueError(f"config.init_from={spec}: the Megatron trainer starts from release-layout "
                         f"files (.pt/.safetensors); convert with `python -m converters convert "
                         f"--src {spec} --dst release:dit.safetensors` first")
    from mugv_megatron.dit import read_release_checkpoint
    return read_release_checkpoint(spec.removeprefix("release:"))


def train(config, workdir: str, overrides: dict | None = None) -> dict:
    """Run (or resume) training; returns a summary {step, loss, skipped, stopped_by}."""
    from megatron.core import parallel_state as ps
    from mugv_jax.metrics import MetricsWriter   # tensorboardX + jsonl, no jax import
    from mugv_megatron.trainer import Trainer

    opts = megatron_options(config, overrides)
    model_cfg = model_config_from(config)
    optim_cfg = _dataclass_from(optim.OptimConfig, config.optim)
    objective = _dataclass_from(obj.ObjectiveConfig, config.objective)
    if model_cfg.depth % int(opts["pp"]):
        raise ValueError(f"config.megatron.pp={opts['pp']} does not divide the model's "
                         f"{model_cfg.depth} layers")
    init_distributed(int(opts["tp"]), int(opts["cp"]), int(opts["pp"]))
    rank = dist.get_rank()
    is_main = rank == 0
    if int(config.sample.every) > 0 and is_main:
        log.warning("config.sample.every is ignored by the Megatron trainer (sampling is in mugv_jax)")
    os.makedirs(workdir, exist_ok=True)
    resolved = json.loads(config.to_json_best_effort())
    resolved["megatron"] = opts
    resolved["model_resolved"] = model_cfg.to_dict()
    if is_main:
        tmp = os.path.join(workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(resolved, f, indent=2)
        os.replace(tmp, os.path.join(workdir, "config.json"))
    use_megatron_opt = torch.cuda.is_available() and bool(opts["distributed_optimizer"])
    ckpt_dir = os.path.join(workdir, "checkpoints")
    has_ckpt = bool(checkpointing.steps(ckpt_dir))
    trainer = Trainer(model_cfg, optim_cfg, objective, seed=int(config.seed),
                      compute_dtype=config.compute_dtype, sequence_parallel=bool(opts["sp"]),
                      use_megatron_optimizer=use_megatron_opt, use_te=opts["use_te"],
                      params_dtype=opts["params_dtype"], recompute=opts["recompute"],
                      overlap_grad_reduce=bool(opts["overlap_grad_reduce"]),
                      overlap_param_gather=bool(opts["overlap_param_gather"]),
                      release_state=None if has_ckpt else _release_state(config.init_from, model_cfg))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    it, returns_local = build_iterator(config, model_cfg, dp_rank, dp_size)
    meta = checkpointing.restore_latest(ckpt_dir, trainer) if has_ckpt else None
    if meta is None and has_ckpt and config.init_from:
        # Every checkpoint was unreadable: start as a fresh run would, from init_from.
        trainer.reinitialize_from(_release_state(config.init_from, model_cfg), source=config.init_from)
    if meta is not None:
        it.set_state(meta["data"])
        if is_main:
            log.info("resumed from %s at step %d", ckpt_dir, trainer.step)
    tp = ps.get_tensor_model_parallel_world_size()
    if is_main:
        log.info("Megatron-Core: world %d = TP %d x CP %d x PP %d x DP %d%s; model %s (%d layers, "
                 "hidden %d); optimizer %s", dist.get_world_size(), tp, trainer.cp_size,
                 trainer.pp_size, dp_size, " + SP" if opts["sp"] else "", config.model,
                 model_cfg.depth, model_cfg.hidden_size, trainer.optimizer.kind)

    writer = MetricsWriter(os.path.join(workdir, "tensorboard"), enabled=is_main)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = flops_lib.peak_flops_for(device_name)
    n_dev = dist.get_world_size()
    stop = {"signal": None}
    prev_handler = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    keep = int(config.keep_checkpoints)

    def save():
        checkpointing.save(ckpt_dir, trainer, it.get_state(), resolved, keep=keep,
                           async_save=bool(opts["async_save"]))

    total = int(config.num_steps)
    summary = {"step": trainer.step, "loss": None, "skipped": trainer.skipped, "stopped_by": "num_steps"}
    window_t, window_steps = time.perf_counter(), 0
    try:
        while trainer.step < total:
            host_batch = next(it)
            host_batch.pop("prompt_id", None)
            batch_size = host_batch["latents"].shape[0] * (dp_size if returns_local else 1)
            latent_shape = host_batch["latents"].shape[2:]
            m = trainer.train_step(host_batch, local=returns_local)
            checkpointing.finalize_async()
            step = trainer.step
            window_steps += 1
            if step % int(config.log_every) == 0 or step == total:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - window_t) / window_steps
                n_tokens = num_video_tokens(tuple(latent_shape), model_cfg)
                sf = flops_lib.step_flops(model_cfg, batch_size, n_tokens, host_batch["y"].shape[2])
                scalars = {
                    "loss": m["loss"], "grad_norm": m["grad_norm"], "learning_rate": m["learning_rate"],
                    "step_time": dt, "samples_per_second": batch_size / dt,
                    "tokens_per_second": batch_size * n_tokens / dt,
                    "tflops_per_device": sf.train / dt / n_dev / 1e12,
                    "mfu": flops_lib.mfu(sf.train, dt, n_dev, peak),
                    "hfu": flops_lib.mfu(flops_lib.hardware_step_flops(
                        model_cfg, batch_size, n_tokens, host_batch["y"].shape[2], trainer.recompute).train,
                        dt, n_dev, peak),
                    "skipped_steps": trainer.skipped,
                }
                for q, v in enumerate(m["loss_by_t_quartile"]):
                    scalars[f"loss_by_t/q{q}"] = v
                writer.write(step, scalars)
                writer.console(step, total, scalars)
                summary.update(loss=m["loss"], skipped=trainer.skipped)
                window_t, window_steps = time.perf_counter(), 0
            if m["nonfinite_in_a_row"]:
                log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                            step, m["nonfinite_in_a_row"])
                if m["nonfinite_in_a_row"] >= int(config.max_nonfinite_in_a_row):
                    checkpointing.finalize_async(blocking=True)
                    last = checkpointing.steps(ckpt_dir)
                    raise NonFiniteLossError(
                        f"{m['nonfinite_in_a_row']} non-finite steps in a row (limit "
                        f"config.max_nonfinite_in_a_row={config.max_nonfinite_in_a_row}) at step {step}; "
                        f"last good checkpoint: "
                        f"{checkpointing.iter_dir(ckpt_dir, last[-1]) if last else 'none'}")
            # Every rank must agree to stop, or the collective save would hang on the others.
            flag = torch.tensor([0 if stop["signal"] is None else 1], device=trainer.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag):
                log.warning("SIGTERM received: saving step %d and exiting", step)
                save()
                summary["stopped_by"] = "sigterm"
                break
            if step % int(config.checkpoint_every) == 0 or step == total:
                save()
        checkpointing.finalize_async(blocking=True)
        summary["step"] = trainer.step
        summary["skipped"] = trainer.skipped
    finally:
        signal.signal(signal.SIGTERM, prev_handler)
        writer.close()
    summary["trainer"] = trainer
    return summary


def main(argv):
    from absl import flags
    FLAGS = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    overrides = {"tp": FLAGS.tp, "pp": FLAGS.pp, "cp": FLAGS.cp, "sp": FLAGS.sp,
                 "distributed_optimizer": FLAGS.distributed_optimizer}
    summary = train(FLAGS.config, FLAGS.workdir, overrides)
    if dist.get_rank() == 0:
        print(f"finished at step {summary['step']} ({summary['stopped_by']}); last loss {summary['loss']}; "
              f"skipped steps {summary['skipped']}; workdir {FLAGS.workdir}")
    parallel.teardown()


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, logs and config.json go here")
    flags.DEFINE_integer("tp", None, "tensor-parallel size (overrides config.megatron.tp)")
    flags.DEFINE_integer("pp", None, "pipeline-parallel size (overrides config.megatron.pp; must "
                         "divide the depth)")
    flags.DEFINE_integer("cp", None, "context-parallel size (overrides config.megatron.cp)")
    flags.DEFINE_bool("sp", None, "sequence parallel (overrides config.megatron.sp)")
    flags.DEFINE_bool("distributed_optimizer", None, "megatron DistributedOptimizer on CUDA "
                      "(overrides config.megatron.distributed_optimizer; torch AdamW otherwise)")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
