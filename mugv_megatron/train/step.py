"""The Megatron-Core train step: objective, gradient reductions, AdamW, EMA, non-finite skip.

Needs megatron's parallel state (`mugv_megatron.parallel.state.setup`, or a launcher that
initialised torch.distributed first). Tensor and sequence parallelism are the model's;
data parallelism is here: every DP rank takes its slice of the global batch and draws the
noise/timesteps/masks of its own rows only, one micro-batch at a time, from per-sample streams
keyed by (seed, step, global sample index) on the training device (`objective.SampleStreams`),
so the DP size, like gradient accumulation, changes memory and schedule but not the math.

Precision, two layouts:
  * float32 parameters (the CPU path, and the GPU path with the torch optimizer or
    `params_dtype="float32"`): the parameters are the master weights; `compute_dtype`
    "bfloat16" runs forward and backward under `torch.autocast(bfloat16)` (matmuls and
    attention in bf16; the model keeps norms, RoPE, sinusoids and modulation in float32).
  * bfloat16 parameters with megatron's DistributedOptimizer (the default on GPU when computing
    in bf16, as the reference trainer runs): the model holds bf16 weights, the optimizer keeps
    the fp32 main weights sharded over data parallel (ZeRO-1), gradients are accumulated and
    reduce-scattered in fp32 (`grad_reduce_in_fp32`), and the forward still runs under autocast.
    The EMA then tracks the fp32 main weights, sharded the same way (`ema.ShardedEMA`).

Activation recompute (`recompute`: "none", "full" = every layer re-run in backward, "selective"
= core attention re-run) is set on the model's TransformerConfig (`mugv_megatron.model.recompute`).
With the distributed optimizer, `overlap_grad_reduce` reduce-scatters gradient buckets during
backward and `overlap_param_gather` all-gathers the updated parameters bucket by bucket in the
next forward (megatron DDP's forward pre-hooks): until then a rank's copy of the other ranks'
parameter shards is stale, so anything reading the weights between steps calls `sync_params()`
(the checkpoint does).

Reductions after backward: the data-parallel mean of every gradient (all-reduce on the CPU
path, megatron DDP's bucketed reduce(-scatter) on GPU), then megatron's own tensor-parallel sum
for replicated parameters that see sequence-split tokens or are q/k norms
(`_allreduce_non_tensor_model_parallel_grads`, what `finalize_model_grads` runs).

Context and pipeline parallelism (CP > 1 or PP > 1) run the step through
`mugv_megatron.parallel.pipeline_parallel`: the stage is wrapped in megatron's DDP (`pipeline.wrap_ddp`),
gradient-accumulation micro-batches become the schedule's micro-batches, and
`pipeline.forward_backward` scales each loss by CP / micro-batches and runs megatron's
`finalize_model_grads` (mean over DP×CP, which with the CP factor is the CP sum; the replicated
embedders summed over the pipeline stages; SP/q-k-norm grads summed over TP). The loss is
computed on the last stage and broadcast over the pipeline group. The global gradient norm counts
each TP shard once and each replicated embedder once (on the first stage; the other stages' copies
are flagged `shared`, which megatron's own norm also skips) and is summed over TP × PP; grads are
already identical over DP and CP. Whether a step is finite is agreed over the whole world, so no
rank updates while another skips. EMA and optimizer state are per stage (each rank's own
parameters). A stage's initial weights are drawn with the seed offset by the pipeline rank (so the
stages' layers differ), then the replicated embedders are broadcast from the first stage.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from mugv import rng
from mugv.config import DiTConfig
from mugv.init import InitialWeights
from mugv.layouts import megatron as layout
from mugv.lora import FreezeConfig, LoraConfig
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_megatron.model import build as dit
from mugv_megatron.model import lora as lora_lib
from mugv_megatron.model import recompute as recompute_lib
from mugv_megatron.parallel import pipeline_parallel as pipeline
from mugv_megatron.train import objective as obj
from mugv_megatron.train import optim
from mugv_megatron.train.ema import EMA, ShardedEMA

PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

T_QUARTILES = 4


class _TorchTensors(Mapping):
    """A mapping of numpy arrays read as torch tensors, one at a time (`mugv.init` draws each
    tensor when read, so a fresh 10B model is never whole in host memory)."""

    def __init__(self, arrays: Mapping):
        self.arrays = arrays

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.arrays[name])

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


class Trainer:
    def __init__(
        self,
        model_config: DiTConfig,
        optim_config: OptimConfig,
        objective: ObjectiveConfig,
        *,
        seed: int = 0,
        compute_dtype: str = "float32",
        sequence_parallel: bool = False,
        use_megatron_optimizer: bool | None = None,
        release_state: dict | None = None,
        use_te: bool | None = None,
        params_dtype: str | None = None,
        recompute: str = "none",
        overlap_grad_reduce: bool = False,
        overlap_param_gather: bool = False,
        ddp_bucket_size: int | None = None,
        local_attention: str = "megatron",
        micro_batch_size: int | None = None,
        lora: LoraConfig | None = None,
        freeze: FreezeConfig | None = None,
    ):
        """`use_megatron_optimizer` (default: CUDA present) selects megatron's DDP +
        DistributedOptimizer; `params_dtype` (None: "bfloat16" with it when computing in bf16,
        else "float32"); the overlaps apply only with it (megatron DDP's buckets, of
        `ddp_bucket_size` elements when given). `micro_batch_size` (samples per data-parallel
        rank per micro-batch) sets the accumulation per step; None: optim.grad_accum_steps.
        `lora` (mugv/lora.py, on): the base is frozen and only its adapters train (EMA of them).
        `freeze`: release modules that keep their starting values (no gradients, no optimizer
        state; the EMA still covers them, at their fixed values)."""
        from megatron.core import parallel_state as ps

        if compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {compute_dtype!r}")
        if not ps.model_parallel_is_initialized():
            raise RuntimeError(
                "megatron parallel state is not initialised: call "
                "mugv_megatron.parallel.state.setup(...) before building the Trainer"
            )
        if use_megatron_optimizer is None:
            use_megatron_optimizer = torch.cuda.is_available()
        if use_megatron_optimizer and not torch.cuda.is_available():
            from mugv_megatron.parallel import distopt_cpu

            if not distopt_cpu.is_applied():
                raise ValueError(
                    "config.megatron.distributed_optimizer: megatron's "
                    "DistributedOptimizer needs CUDA (or, for tests, "
                    "mugv_megatron.parallel.distopt_cpu.apply() on CPU)"
                )
        self.bf16 = compute_dtype == "bfloat16"
        if params_dtype is None:
            params_dtype = "bfloat16" if self.bf16 and use_megatron_optimizer else "float32"
        if params_dtype not in PARAMS_DTYPES:
            raise ValueError(
                f"config.megatron.params_dtype must be one of {sorted(PARAMS_DTYPES)} or None, got {params_dtype!r}"
            )
        if params_dtype == "bfloat16" and not (use_megatron_optimizer and self.bf16):
            raise ValueError(
                "config.megatron.params_dtype='bfloat16' needs compute_dtype='bfloat16' "
                "and the distributed optimizer (which keeps the fp32 main weights)"
            )
        self.params_dtype = params_dtype
        self.recompute = recompute_lib.check(recompute)
        self.model_config, self.optim, self.objective = model_config, optim_config, objective
        self.seed = int(seed)
        self.micro_batch_size = None if micro_batch_size is None else int(micro_batch_size)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.cp_size = ps.get_context_parallel_world_size()
        # CP or PP: the step runs through megatron's DDP and mugv_megatron.parallel.pipeline_parallel.
        self.staged = self.pp_size > 1 or self.cp_size > 1
        self.lora = lora if lora is not None and lora.on else None
        self.freeze = freeze if freeze is not None and freeze.modules else None
        if (self.lora or self.freeze) and (self.staged or use_megatron_optimizer):
            raise ValueError(
                "config.lora / config.freeze on the megatron trainer: not yet with pipeline/context parallelism "
                "or megatron's distributed optimizer (set config.megatron.distributed_optimizer=False, pp=cp=1)"
            )
        torch.manual_seed(self.seed + self.pp_rank)
        # Every weight is loaded below, but megatron's initialisation stays on: with it off the
        # TP=2 step no longer matched TP=1 (tests/cross_backend/test_cross_backend_training.py),
        # as the layers it builds then lack something the loaded state does not carry.
        self.module = dit.build_model(
            model_config,
            sequence_parallel=sequence_parallel,
            use_te=use_te,
            params_dtype=PARAMS_DTYPES[params_dtype],
            local_attention=local_attention,
            perform_initialization=True,
        )
        recompute_lib.apply(self.module, self.recompute)
        if self.pp_size > 1:
            self._sync_replicated_embedders()
        source = "config.init_from"
        if release_state is None:
            # A fresh run: the seed's weights of mugv.init, the ones the JAX trainer starts from
            # (the same on every rank and stage, whatever the layout).
            release_state, source = _TorchTensors(InitialWeights(model_config, self.seed)), "mugv.init"
        self._load_release_state(release_state, source)
        if self.freeze:
            for n, p in self.module.named_parameters():
                if layout.release_name(n).split(".", 1)[0] in self.freeze.modules:
                    p.requires_grad_(False)
        if self.lora:
            lora_lib.add_adapters(self.module, self.lora)
        self.module.train()
        self.null_text = torch.from_numpy(
            rng.null_text(self.seed, model_config.max_text_tokens, model_config.text_dim)
        ).to(self.device)
        self.model = self.module
        # megatron's own schedule (GPU) can overlap the grad reduction across micro-batches; the
        # CPU sequential schedule of PP/CP runs without DDP's no-sync hooks.
        self.overlap_grad_reduce = (
            bool(overlap_grad_reduce) and use_megatron_optimizer and not (self.staged and not torch.cuda.is_available())
        )
        self.overlap_param_gather = bool(overlap_param_gather) and use_megatron_optimizer
        if self.staged and not use_megatron_optimizer:
            self.model = pipeline.wrap_ddp(self.module)
        elif use_megatron_optimizer:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=self.overlap_grad_reduce,
                overlap_param_gather=self.overlap_param_gather,
                use_distributed_optimizer=True,
                bucket_size=ddp_bucket_size,
            )
            self.model = DistributedDataParallel(config=self.module.config, ddp_config=ddp_config, module=self.module)
            if self.overlap_grad_reduce:
                # What megatron's schedules call between micro-batches and after the last one.
                self.module.config.no_sync_func = self.model.no_sync
                self.module.config.grad_sync_func = self.model.start_grad_sync
        else:
            from megatron.core.distributed import DistributedDataParallelConfig

            # megatron's TP grad reduction reads the DDP config of the model it is given.
            self.module.ddp_config = DistributedDataParallelConfig()
        self.optimizer = optim.build(
            self.model if use_megatron_optimizer else self.module,
            optim_config,
            use_megatron=use_megatron_optimizer,
            tp_group=self.tp_group,
            bf16_params=params_dtype == "bfloat16",
            overlap_param_gather=self.overlap_param_gather,
        )
        if params_dtype != "float32":
            # The model holds the release weights rounded to bf16; the main weights take them exact.
            self.optimizer.set_main_params(pipeline.stage_state(self.module, release_state))
        self.ema = self._new_ema()
        self.step, self.nonfinite, self.skipped = 0, 0, 0

    def _new_ema(self):
        if self.optimizer.kind == "megatron_distributed":
            return ShardedEMA(self.module, self.optimizer, self.optim.ema_decay)
        trained = ((n, p) for n, p in self.module.named_parameters() if p.requires_grad or not self.lora)
        return EMA(trained, self.optim.ema_decay)

    def reinitialize_from(self, release_state: dict, source: str = "config.init_from") -> None:
        """Weights (and main weights and EMA) from a release state dict, as a fresh run starts."""
        self._load_release_state(release_state, source)
        if self.optimizer.kind == "megatron_distributed":
            self.optimizer.set_main_params(pipeline.stage_state(self.module, release_state))
        self.ema = self._new_ema()

    def _load_release_state(self, release_state: dict, source: str) -> None:
        if self.pp_size > 1:
            pipeline.load_release_state(self.module, release_state, source=source)
        else:
            dit.load_release_state(self.module, release_state, source=source)

    def sync_params(self) -> None:
        """Bring every rank's full copy of the weights up to date (the parameter all-gather is
        deferred to the next forward under `overlap_param_gather`)."""
        if self.overlap_param_gather:
            self.model.start_param_sync(force_sync=True)

    def _sync_replicated_embedders(self) -> None:
        """Every stage holds the embedders: give them the first stage's initial values, and flag
        the later stages' copies `shared` so that no gradient norm counts them twice."""
        from megatron.core import parallel_state as ps

        group = ps.get_pipeline_model_parallel_group()
        src = ps.get_pipeline_model_parallel_first_rank()
        with torch.no_grad():
            for p in self.module.parameters():
                if getattr(p, "pipeline_parallel", False):
                    dist.broadcast(p.data, src=src, group=group)
                    if self.pp_rank > 0:
                        p.shared = True

    # --- counters (checkpointed) --------------------------------------------------------------

    def counters(self) -> dict:
        # `seed` keys every step's draws (like the JAX state's rng), so it travels with the state.
        return {"step": self.step, "nonfinite": self.nonfinite, "skipped": self.skipped, "seed": self.seed}

    def set_counters(self, c: dict) -> None:
        self.step, self.nonfinite, self.skipped = int(c["step"]), int(c["nonfinite"]), int(c["skipped"])
        self.seed = int(c["seed"])

    # --- pieces -------------------------------------------------------------------------------

    def draws(self, global_shape: tuple[int, ...], step: int | None = None, rows: slice | None = None) -> obj.Draws:
        """The step's random numbers for rows `rows` (default: all) of a global batch of latents
        `global_shape`, from (seed, step, sample index) alone, on the training device."""
        return self.streams(global_shape, step, rows).materialize()

    def streams(
        self, global_shape: tuple[int, ...], step: int | None = None, rows: slice | None = None
    ) -> obj.SampleStreams:
        step = self.step if step is None else step
        rows = slice(0, global_shape[0]) if rows is None else rows
        return obj.SampleStreams(
            self.seed, int(step), rows.start, rows.stop, tuple(global_shape[1:]), self.objective, str(self.device)
        )

    def forward_loss(self, inputs: dict, target: torch.Tensor):
        """(loss, per-sample loss) of prepared inputs, under autocast when computing in bf16."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(**inputs)
        pred = out[:, : self.model_config.in_channels].float()
        return obj.masked_frame_mse(pred, target, inputs["x_mask"])

    def _finalize_grads(self) -> None:
        from megatron.core.distributed.finalize_model_grads import (
            _allreduce_non_tensor_model_parallel_grads,
            finalize_model_grads,
        )

        if self.optimizer.kind == "megatron_distributed":
            finalize_model_grads([self.model])
            return
        if self.dp_size > 1:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dp_group)
            flat /= self.dp_size
            for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(s)
        _allreduce_non_tensor_model_parallel_grads([self.module], self.module.config)

    def loss_and_grads(self, batch: dict, draws: obj.Draws):
        """Forward + backward of this rank's batch (all micro-batches) and the gradient
        reductions. Returns (mean loss of the local batch, per-t-quartile sums and counts)."""
        b = batch["latents"].shape[0]
        if len(draws.u if isinstance(draws, obj.Draws) else draws) != b:
            raise ValueError(f"draws for {len(draws.u if isinstance(draws, obj.Draws) else draws)} rows, batch of {b}")
        if self.micro_batch_size is not None:
            if b % self.micro_batch_size:
                raise ValueError(
                    f"batch {b} per data-parallel rank is not divisible by "
                    f"config.megatron.micro_batch_size={self.micro_batch_size}"
                )
            accum = b // self.micro_batch_size
        else:
            accum = self.optim.grad_accum_steps
            if b % accum:
                raise ValueError(f"batch {b} per data-parallel rank is not divisible by optim.grad_accum_steps={accum}")
        mb = b // accum
        if self.staged:
            return self._staged_loss_and_grads(batch, draws, accum, mb)
        total = torch.zeros((), device=self.device)
        q_sum = torch.zeros(T_QUARTILES, device=self.device)
        q_count = torch.zeros(T_QUARTILES, device=self.device)
        self.optimizer.zero_grad()
        for i in range(accum):
            sl = slice(i * mb, (i + 1) * mb)
            part = {k: v[sl] for k, v in batch.items() if v is not None}
            inputs, target, t = obj.prepare(
                part, self.null_text, self.objective, draws.slice(sl.start, sl.stop), self.device
            )
            # Megatron DDP reduces a bucket as soon as its grads are in: only after the last
            # micro-batch.
            no_sync = self.model.no_sync if hasattr(self.model, "no_sync") and i < accum - 1 else contextlib.nullcontext
            with no_sync():
                loss, per_sample = self.forward_loss(inputs, target)
                (loss / accum).backward()
            total += loss.detach() / accum
            quart = (t / (1000.0 / T_QUARTILES)).long().clamp(0, T_QUARTILES - 1)
            q_sum.index_add_(0, quart, per_sample.detach())
            q_count.index_add_(0, quart, torch.ones_like(per_sample))
        self._finalize_grads()
        return total, q_sum, q_count

    def _staged_loss_and_grads(self, batch: dict, draws: obj.Draws, accum: int, mb: int):
        """The CP/PP path: micro-batches through `pipeline.forward_backward`; the grads (reduced
        by megatron's finalize_model_grads into `main_grad`) become `p.grad` for the optimizer."""
        from megatron.core import parallel_state as ps

        q_sum = torch.zeros(T_QUARTILES, device=self.device)
        q_count = torch.zeros(T_QUARTILES, device=self.device)
        self.optimizer.zero_grad()
        if hasattr(self.model, "zero_grad_buffer"):
            self.model.zero_grad_buffer()
        micro = []
        for i in range(accum):
            sl = slice(i * mb, (i + 1) * mb)
            part = {k: v[sl] for k, v in batch.items() if v is not None}
            inputs, target, t = obj.prepare(
                part, self.null_text, self.objective, draws.slice(sl.start, sl.stop), self.device
            )
            micro.append({**{k: v for k, v in inputs.items() if v is not None}, "target": target, "t": t})
        c = self.model_config.in_channels

        def loss_fn(output, m):
            loss, per_sample = obj.masked_frame_mse(output[:, :c].float(), m["target"], m["x_mask"])
            quart = (m["t"] / (1000.0 / T_QUARTILES)).long().clamp(0, T_QUARTILES - 1)
            q_sum.index_add_(0, quart, per_sample.detach())
            q_count.index_add_(0, quart, torch.ones_like(per_sample))
            return loss

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = pipeline.forward_backward(self.model, micro, loss_fn)
        if self.pp_size > 1:
            # Only the last stage saw the per-sample losses.
            stats = torch.cat([q_sum, q_count])
            dist.broadcast(
                stats, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
            )
            q_sum, q_count = stats[:T_QUARTILES], stats[T_QUARTILES:]
        if self.optimizer.kind == "torch_adamw":
            for p in self.module.parameters():
                p.grad = p.main_grad
        return loss, q_sum, q_count

    def grad_norm(self) -> float:
        """Global gradient norm over every parameter of the model, whatever the layout."""
        if not self.staged or self.optimizer.kind != "torch_adamw":
            return float(self.optimizer.grad_norm())
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.module.parameters():
            if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                sq += p.grad.detach().double().square().sum()
        dist.all_reduce(sq, group=ps.get_model_parallel_group())  # TP × PP
        return float(sq.sqrt().float())

    # --- the step -----------------------------------------------------------------------------

    def local_rows(self, global_batch_size: int) -> slice:
        if global_batch_size % self.dp_size:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by the data-parallel size {self.dp_size}"
            )
        per = global_batch_size // self.dp_size
        return slice(self.dp_rank * per, (self.dp_rank + 1) * per)

    def apply_update(self, loss: float, norm: float) -> tuple[bool, float]:
        """The optimizer + EMA update of the gradients in place, taken only when the loss and the
        gradient norm are finite on every rank; advances the counters. Returns (finite, lr)."""
        finite = math.isfinite(loss) and math.isfinite(norm)
        if dist.get_world_size() > 1:
            # Every rank must take the same decision, or stages/replicas would drift apart.
            flag = torch.tensor([1 if finite else 0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(int(flag))
        if finite:
            lr = self.optimizer.apply(norm)
            self.ema.update()
            self.nonfinite = 0
        else:
            lr = optim.learning_rate(self.optim, self.optimizer.count)
            self.nonfinite += 1
            self.skipped += 1
        self.optimizer.zero_grad()
        self.step += 1
        return finite, lr

    def train_step(self, batch: dict, *, local: bool = False, draws: obj.Draws | None = None) -> dict:
        """One optimizer step on a host batch (numpy dict: latents, y, mask, fps[, frame_indice]).

        `batch` is the global batch (every rank passes the same one, e.g. the synthetic source)
        or, with local=True, this DP rank's slice of it (the shard loader). `draws` (for the
        global batch) replaces the step's own random numbers (`streams`, drawn per micro-batch for
        this rank's rows only): the hook the parity tests use."""
        b = batch["latents"].shape[0] * (self.dp_size if local else 1)
        rows = self.local_rows(b)
        if draws is None:
            draws = self.streams((b, *batch["latents"].shape[1:]), rows=rows)
        else:
            draws = draws.slice(rows.start, rows.stop)
        if not local:
            batch = {k: v[rows] for k, v in batch.items() if v is not None}
        loss, q_sum, q_count = self.loss_and_grads(batch, draws)
        if self.dp_size > 1:
            stats = torch.cat([loss.view(1), q_sum, q_count])
            dist.all_reduce(stats, group=self.dp_group)
            loss, q_sum, q_count = stats[0] / self.dp_size, stats[1:5], stats[5:]
        loss_v = float(loss)
        norm = self.grad_norm()
        finite, lr = self.apply_update(loss_v, norm)
        return {
            "loss": loss_v,
            "grad_norm": norm,
            "learning_rate": lr,
            "finite": finite,
            "loss_by_t_quartile": (q_sum / q_count.clamp_min(1)).tolist(),
            "loss_by_t_count": q_count.tolist(),  # 0: no sample in that quartile this step
            "nonfinite_in_a_row": self.nonfinite,
        }
