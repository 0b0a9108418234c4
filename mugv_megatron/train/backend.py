"""Train MUG-DiT on Megatron-Core: `python -m mugv_megatron.train --config=configs/tiny.py --workdir=DIR`.

The same configs, tasks and run loop as `mugv_jax.train` (mugv.run.driver: data and image:video
mixing, validation, preference mode, init_from any format with `init_weights`, checkpoint/log
cadence, SIGTERM, non-finite steps); `config.megatron` (tp, sp, pp, cp, distributed_optimizer,
use_te; mugv.training.MegatronOptions) says how to run, and `--tp`, `--sp`, `--pp`, `--cp`
override it. One process per GPU under torchrun (launch/megatron_torchrun.sh); without a launcher
it runs as a one-process world (CPU works for the tiny config). `--workdir` holds checkpoints/
(torch_dist, see mugv_megatron/train/checkpointing.py), tensorboard/ (event files + metrics.jsonl) and
config.json. Re-running the same command resumes from the newest readable checkpoint.

Recipe fields this backend cannot honour are refused by name (`refused_fields`): sampling during
training (`config.sample.every`; sample with `python -m mugv_jax.sample` from a converted
checkpoint). The JAX backend's execution settings (`mesh`, `attention`, `remat`) are not read here,
as the JAX backend does not read `config.megatron`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from mugv.config import DiTConfig
from mugv.data.preference import batch_kind
from mugv.io import peft
from mugv.io.base import to_torch
from mugv.io.weights import open_weights
from mugv.run import driver, tasks
from mugv.run.config import RunConfig, as_run_config
from mugv.run.typed import ConfigError
from mugv.run.validation import ValidationSet
from mugv_megatron.parallel import state as parallel
from mugv_megatron.plan import batch_split
from mugv_megatron.train import checkpointing, validation

log = logging.getLogger("mugv.megatron.train")


def with_overrides(run: RunConfig, overrides: dict | None) -> RunConfig:
    """`run` with the command line's --tp/--sp/--pp/--cp/... (None: not given) in config.megatron."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not given:
        return run
    try:
        return run.replace(megatron=dataclasses.replace(run.megatron, **given))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def megatron_options(config, overrides: dict | None = None) -> dict:
    """config.megatron (defaults: mugv.training.MegatronOptions) with non-None overrides applied."""
    return dataclasses.asdict(with_overrides(as_run_config(config), overrides).megatron)


def refused_fields(run: RunConfig) -> list[str]:
    """Recipe fields of `run` set to something the Megatron backend cannot do."""
    out = []
    if run.sample.every > 0:
        out.append(
            f"config.sample.every={run.sample.every} (the megatron backend does not sample during "
            f"training; convert a checkpoint and use python -m mugv_jax.sample)"
        )
    tuned = run.lora.on or run.freeze.modules
    if tuned and run.mode == "preference":
        out.append(
            f"config.lora.rank={run.lora.rank} / config.freeze.modules={run.freeze.modules} with "
            f"config.mode='preference' (preference training of adapters or with frozen modules is not built)"
        )
    elif tuned and (
        run.megatron.pp > 1 or run.megatron.cp > 1 or (torch.cuda.is_available() and run.megatron.distributed_optimizer)
    ):
        out.append(
            f"config.lora.rank={run.lora.rank} / config.freeze.modules={run.freeze.modules} with "
            f"pipeline/context parallelism or megatron's distributed optimizer (set "
            f"--config.megatron.pp=1 --config.megatron.cp=1 --config.megatron.distributed_optimizer=False)"
        )
    if run.lora.on and run.lora.base_dtype != "float32":
        out.append(
            f"config.lora.base_dtype={run.lora.base_dtype!r} (a frozen base in its own dtype is built on the "
            f"JAX backend only; here --config.megatron.params_dtype sets every weight's dtype)"
        )
    return out


def world_size() -> int:
    """The world torchrun describes (or the one already initialised; 1 without a launcher)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(tp: int, cp: int = 1, pp: int = 1) -> None:
    """torch.distributed from torchrun's environment (or a one-process world), then megatron's
    parallel state with tensor-, context- and pipeline-parallel sizes `tp`, `cp`, `pp`
    (data parallel = world / (tp·cp·pp))."""
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            "nccl" if on_gpu else "gloo", init_method="env://", timeout=datetime.timedelta(minutes=30)
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % (tp * cp * pp):
        raise ValueError(f"world size {world} is not divisible by config.megatron.tp={tp} × cp={cp} × pp={pp}")
    parallel.setup(
        tp,
        rank=dist.get_rank() if dist.is_initialized() else 0,
        world_size=world,
        context_parallel_size=cp,
        pipeline_parallel_size=pp,
    )


def release_state_from(spec: str, model_cfg: DiTConfig, weights: str = "raw") -> dict | None:
    """Release-layout {name: tensor} of `config.init_from` in any format: a release file
    (.pt/.safetensors/index), `jax:DIR[@STEP]` or `megatron:DIR[@ITER]` (weights "raw" or "ema").
    Every rank reads it (no collective), so it works in any world."""
    if not spec:
        return None
    return {name: to_torch(a) for name, a in open_weights(spec, model=model_cfg, weights=weights).items()}


class MegatronBackend:
    """The Megatron side of a DiT run (pretraining or preference) for mugv.run.driver."""

    name = "megatron"

    def __init__(self, run: RunConfig, workdir: str, task, resolved: dict):
        from megatron.core import parallel_state as ps

        refused = refused_fields(run)
        if refused:
            raise ConfigError("the megatron backend cannot honour " + "; ".join(refused))
        self.run, self.task = run, task
        self.opts = opts = run.megatron
        self.model_cfg = model_cfg = run.model_config
        if model_cfg.depth % opts.pp:
            raise ConfigError(f"--config.megatron.pp={opts.pp} does not divide the model's {model_cfg.depth} layers")
        if task.name == "preference" and (opts.pp > 1 or opts.cp > 1):
            raise ConfigError(
                f"--config.mode='preference' on the megatron backend runs with tensor, sequence and "
                f"data parallelism: set --config.megatron.pp=1 and --config.megatron.cp=1 (got "
                f"pp={opts.pp}, cp={opts.cp})"
            )
        if task.name == "preference" and opts.micro_batch_size is not None:
            raise ConfigError(
                "--config.mode='preference' does not accumulate gradients: unset "
                f"--config.megatron.micro_batch_size (got {opts.micro_batch_size})"
            )
        world, model_parallel = world_size(), opts.tp * opts.cp * opts.pp
        if task.name != "preference" and world % model_parallel == 0:  # (init_distributed names the other case)
            # Refused here, before any process group or model exists (the step would fail later).
            dp = world // model_parallel
            for what, batch in run.global_batches():
                try:
                    batch_split(batch, dp, opts.micro_batch_size, run.optim.grad_accum_steps)
                except ValueError as err:
                    raise ConfigError(f"{what}: {err}") from None
        init_distributed(opts.tp, opts.cp, opts.pp)
        self.checkpoint_dir = self.ckpt_dir = os.path.join(workdir, "checkpoints")
        self.run_config = resolved
        self.is_main = dist.get_rank() == 0
        self.data_shard = (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        self.num_devices = dist.get_world_size()
        self.device_kind = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.recompute = opts.recompute
        self.trainer = None
        self.restored_config = None
        self.step = 0
        self._profiler = None

    def _build(self, release_state: dict | None):
        from mugv_megatron.train.step import Trainer

        opts, run = self.opts, self.run
        kwargs = dict(
            seed=run.seed,
            compute_dtype=run.compute_dtype,
            sequence_parallel=opts.sp,
            use_megatron_optimizer=torch.cuda.is_available() and opts.distributed_optimizer,
            use_te=opts.use_te,
            local_attention=opts.local_attention,
            params_dtype=opts.params_dtype,
            recompute=opts.recompute,
            micro_batch_size=opts.micro_batch_size,
            overlap_grad_reduce=opts.overlap_grad_reduce,
            overlap_param_gather=opts.overlap_param_gather,
            release_state=release_state,
        )
        if self.task.name == "preference":
            from mugv_megatron.train.preference import PreferenceTrainer

            return PreferenceTrainer(self.model_cfg, run.optim, run.objective, preference=run.preference, **kwargs)
        return Trainer(self.model_cfg, run.optim, run.objective, lora=run.lora, freeze=run.freeze, **kwargs)

    def _describe(self) -> None:
        if self.is_main:
            t = self.trainer
            log.info(
                "Megatron-Core: world %d = TP %d x CP %d x PP %d x DP %d%s; model %s (%d layers, hidden %d); "
                "optimizer %s",
                dist.get_world_size(),
                self.opts.tp,
                t.cp_size,
                t.pp_size,
                t.dp_size,
                " + SP" if self.opts.sp else "",
                self.run.model,
                self.model_cfg.depth,
                self.model_cfg.hidden_size,
                t.optimizer.kind,
            )

    # --- state -----------------------------------------------------------------------------------

    def restore(self):
        if not checkpointing.steps(self.ckpt_dir):
            return None
        self.trainer = self._build(None)
        meta = checkpointing.restore_latest(self.ckpt_dir, self.trainer)
        if meta is None:
            self.trainer = None  # every checkpoint unreadable: start as a fresh run would
            return None
        self.restored_config = meta.get("config")
        self.step = self.trainer.step
        self._describe()
        return meta["data"]

    def initialize(self) -> None:
        state, start = None, self.run.starting_weights()
        if start is not None:
            spec, weights = start
            state = release_state_from(spec, self.model_cfg, weights)
            log.info("initialised from %s (%s weights) with a fresh optimizer", spec, weights)
        self.trainer = self._build(state)
        if self.run.lora.init_from:
            from mugv_megatron.model import lora as model_lora

            model_lora.load_adapters(self.trainer.module, peft.read_for(self.run.lora, self.model_cfg))
            self.trainer.ema = self.trainer._new_ema()  # the EMA starts from the imported adapters
            log.info("adapters from the PEFT adapter %s", self.run.lora.init_from)
        self.step = self.trainer.step
        self._describe()

    # --- steps -----------------------------------------------------------------------------------

    def train_step(self, batch: dict):
        m = self.trainer.train_step(batch, local=True)
        checkpointing.finalize_async()  # publishes a finished asynchronous save
        self.step = self.trainer.step
        return m

    def fetch(self, metrics) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return dict(metrics)

    def nonfinite_in_a_row(self, metrics) -> int:
        return int(metrics["nonfinite_in_a_row"])

    def skipped(self) -> int:
        return 0 if self.trainer is None else int(self.trainer.skipped)

    def evaluate(self, request) -> dict:
        if isinstance(request, ValidationSet):
            return request.summarize(validation.validation_per_t(self.trainer, request))
        if isinstance(request, tasks.PreferenceEvaluation):
            sums: dict = {}
            for i, b in enumerate(request.batches):
                kind = batch_kind(b)
                for k, v in self.trainer.evaluate(b, request.seed, i).items():
                    sums.setdefault(f"{kind}/{k}", []).append(float(v))
            return {f"heldout/{k}": float(np.mean(v)) for k, v in sums.items()}
        raise TypeError(f"the megatron backend cannot evaluate {type(request).__name__}")

    # --- checkpoints -----------------------------------------------------------------------------

    def save(self, data_state: dict, *, force: bool = False) -> None:
        # SIGTERM (force) saves synchronously: the process is about to exit.
        checkpointing.save(
            self.ckpt_dir,
            self.trainer,
            data_state,
            self.run_config,
            keep=self.run.keep_checkpoints,
            async_save=self.opts.async_save and not force,
        )

    def checkpoints(self) -> list[str]:
        checkpointing.finalize_async(blocking=True)
        return [checkpointing.iter_dir(self.ckpt_dir, s) for s in checkpointing.steps(self.ckpt_dir)]

    def any_process(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.trainer.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(int(t))

    def finish(self) -> None:
        checkpointing.finalize_async(blocking=True)

    # --- extras ----------------------------------------------------------------------------------

    def start_profile(self, directory: str) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=acts, on_trace_ready=torch.profiler.tensorboard_trace_handler(directory)
        )
        self._profiler.start()

    def stop_profile(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None


def train(config, workdir: str, overrides: dict | None = None) -> dict:
    """Run (or resume) training of a run config (a RunConfig or the ml_collections dict of one)
    with the command line's `overrides` of config.megatron; returns the driver's summary plus the
    `trainer`."""
    run = with_overrides(as_run_config(config), overrides)
    task = tasks.for_config(run)
    resolved = run.resolved()
    backend = MegatronBackend(run, workdir, task, resolved)
    summary = driver.run(run.loop(), workdir, backend, task, resolved=resolved)
    summary["trainer"] = backend.trainer
    return summary
