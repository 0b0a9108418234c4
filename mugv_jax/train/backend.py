"""Train MUG-DiT with JAX: `python -m mugv_jax.train --config=configs/tiny.py --workdir=DIR`.

Configs are Python files returning an ml_collections ConfigDict (`--config=configs/mugv_10b.py:video_720`
picks a stage), overridable per field (`--config.optim.learning_rate=3e-5`). `--workdir` holds
checkpoints/, tensorboard/ (event files + metrics.jsonl) and config.json. Re-running the same
command resumes from the newest readable checkpoint. SIGTERM saves at the next step boundary and
exits 0. Multi-host: run the same command on every host (jax.distributed is initialised from the
environment when `--distributed` is set).

The loop is mugv.run.driver's (shared with the Megatron trainer and the VAE); this module is the
JAX backend: the sharded train state, its step, evaluation, orbax checkpoints and samples.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from mugv.config import DiTConfig
from mugv.io.spec import parse_spec
from mugv.io.weights import load_params, open_weights
from mugv.layouts.jax import unflatten
from mugv.run import driver, tasks
from mugv.run.config import ConfigError, RunConfig, as_run_config
from mugv.run.validation import ValidationSet
from mugv_jax import compilation_cache
from mugv_jax.dit import checkpoint as dit_checkpoint
from mugv_jax.dit.model import RuntimeOptions
from mugv_jax.parallel import mesh as mesh_lib
from mugv_jax.parallel import sharding
from mugv_jax.train import checkpointing, validation
from mugv_jax.train import preference as pref
from mugv_jax.train import step as trainer_lib

log = logging.getLogger("mugv.train")


def init_params_from(spec: str, model_cfg: DiTConfig, weights: str = "raw"):
    """Initial parameters (nested dict) from `config.init_from`: `jax:DIR[@STEP]` (an orbax
    checkpoint), `megatron:DIR[@ITER]` (torch_dist) or a release-layout file (.pt / .safetensors /
    index); `weights` "raw" or "ema" (`config.init_weights`)."""
    if parse_spec(spec).format == "jax":
        # Named as JAX: the layout as stored, no round trip through release names.
        found, params = load_params(spec, weights=weights)
        if found != model_cfg:
            raise ValueError(f"config.init_from={spec} holds a {found} model, but the run's model is {model_cfg}")
        return params
    state = open_weights(spec, model=model_cfg, weights=weights)
    return unflatten(dit_checkpoint.params_from_release_items(state.items(), model_cfg))


def build_trainer(config, mode: str = "pretrain", devices=None, mesh=None):
    """The Trainer (or PreferenceTrainer) a run config describes: model, runtime options,
    optimizer, objective, sharding rules and mesh (over `devices`, default all; or `mesh`: the planner's fake
    devices, an abstract mesh for lowering)."""
    run = as_run_config(config)
    options = RuntimeOptions(
        compute_dtype=run.compute_dtype,
        attention=run.attention,
        remat=run.remat,
        lora_scale=run.lora.scale if run.lora.on else 0.0,
    )
    if mesh is None:
        mesh = mesh_lib.build_mesh(run.mesh.ici.as_dict(), run.mesh.dcn.as_dict(), devices=devices)
    args = (run.model_config, options, run.optim, run.objective, mesh)
    rules = sharding.rules_with(run.sharding_rules)
    if mode == "preference":
        return pref.PreferenceTrainer(*args, rules=rules, preference=run.preference)
    return trainer_lib.Trainer(*args, rules=rules, lora=run.lora, freeze=run.freeze)


class JaxBackend:
    """The JAX side of a DiT run (pretraining or preference) for mugv.run.driver."""

    name = "jax"
    first_step_note = "compiling the step (first step only)…"

    def __init__(self, run: RunConfig, workdir: str, task, resolved: dict):
        if run.lora.on or run.freeze.modules:
            # The Trainer takes them (mugv_jax/train/step.py); checkpoints, EMA export and sampling
            # of a split state are not wired into the run loop yet.
            raise ConfigError(
                f"--config.lora.rank={run.lora.rank} / --config.freeze.modules={run.freeze.modules}: LoRA and "
                f"frozen modules are not in the jax run loop yet; leave them at their defaults"
            )
        self.run, self.task = run, task
        self.trainer = build_trainer(run, task.name)
        self.model_cfg, self.options, self.mesh = self.trainer.model_config, self.trainer.options, self.trainer.mesh
        # Refused here, before anything compiles: a micro-batch that does not divide the mesh's
        # data axes would be replicated over them.
        run.check_batch_split(dict(self.mesh.shape))
        self.ckpt = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=run.keep_checkpoints, use_async=run.async_checkpoint
        )
        self.workdir = workdir
        self.checkpoint_dir = self.ckpt.directory
        self.run_config = {**resolved, "model": self.model_cfg.to_dict()}
        self.is_main = jax.process_index() == 0
        self.data_shard = (jax.process_index(), jax.process_count())
        self.num_devices = self.mesh.size
        self.device_kind = jax.devices()[0].device_kind
        self.recompute = run.remat
        self.state, self.step = None, 0
        self.restored_config = None
        self._validator = None
        log.info(
            "%s; model %s (%d layers, hidden %d)",
            mesh_lib.describe(self.mesh),
            run.model,
            self.model_cfg.depth,
            self.model_cfg.hidden_size,
        )

    # --- state -----------------------------------------------------------------------------------

    def restore(self):
        restored = self.ckpt.restore_latest(self.trainer.abstract_state(), model=self.model_cfg.to_dict())
        if restored is None:
            return None
        self.step, self.state, data_state, self.restored_config = restored
        return data_state

    def initialize(self) -> None:
        params, start = None, self.run.starting_weights()
        if start is not None:
            spec, weights = start
            params = init_params_from(spec, self.model_cfg, weights)
            log.info("initialised from %s (%s weights) with a fresh optimizer", spec, weights)
        self.state = self.trainer.init_state(self.run.seed, params)
        self.step = int(jax.device_get(self.state["step"]))

    # --- steps -----------------------------------------------------------------------------------

    def train_step(self, batch: dict):
        self.state, metrics = self.trainer.train_step(self.state, self.trainer.put_batch(batch))
        self.step += 1
        self.ckpt.poll()  # the digest table of a finished asynchronous save
        return metrics

    def fetch(self, metrics) -> dict:
        m = jax.device_get(metrics)
        return {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in m.items()}

    def nonfinite_in_a_row(self, metrics) -> int:
        if "nonfinite_in_a_row" in metrics:
            return int(jax.device_get(metrics["nonfinite_in_a_row"]))
        return int(jax.device_get(self.state["nonfinite"]))

    def skipped(self) -> int:
        return 0 if self.state is None else int(jax.device_get(self.state["skipped"]))

    def evaluate(self, request) -> dict:
        if isinstance(request, ValidationSet):
            if self._validator is None:
                self._validator = validation.Validator(self.trainer, request)
            return self._validator.evaluate(self.state["params" if request.weights == "raw" else "ema"])
        if isinstance(request, tasks.PreferenceEvaluation):
            return pref.heldout_metrics(
                self.trainer, self.state, [validation.local_rows(b) for b in request.batches], request.seed
            )
        raise TypeError(f"the JAX backend cannot evaluate {type(request).__name__}")

    # --- checkpoints -----------------------------------------------------------------------------

    def save(self, data_state: dict, *, force: bool = False) -> None:
        self.ckpt.save(self.step, self.state, data_state, self.run_config, force=force)

    def checkpoints(self) -> list[str]:
        return [os.path.join(self.ckpt.directory, str(s)) for s in self.ckpt.steps()]

    def any_process(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))

    def finish(self) -> None:
        self.ckpt.wait()
        self.ckpt.close()

    # --- extras ----------------------------------------------------------------------------------

    def start_profile(self, directory: str) -> None:
        jax.profiler.start_trace(directory)

    def stop_profile(self) -> None:
        jax.profiler.stop_trace()

    def write_samples(self, batch: dict, step: int) -> str:
        """Latents sampled from the EMA weights for the first `config.sample.count` captions of the
        run's first batch (null caption as negative), written to <workdir>/samples/step_XXXXXXXX.safetensors."""
        from mugv.safetensors_io import save_atomic
        from mugv_jax.sample import sampler

        run, model_cfg = self.run, self.model_cfg
        n = run.sample.count
        y, mask, fps = batch["y"][:n], batch["mask"][:n], batch["fps"][:n]
        f, h, w = batch["latents"].shape[2:]
        velocity = sampler.make_guided_velocity_from_params(self.state["ema"], model_cfg, self.options)
        null = np.asarray(jax.device_get(self.state["null_text"]))
        length = y.shape[2]
        out = []
        for i in range(y.shape[0]):
            z = sampler.sample(
                None,
                np.zeros((1, model_cfg.in_channels, f, h, w), np.float32),
                y[i : i + 1],
                mask[i : i + 1],
                null[None, None, :length],
                np.ones((1, length), np.int32),
                height=h * 8,
                width=w * 8,
                num_steps=run.sample.steps,
                guidance_scale=run.sample.cfg_scale,
                key=jax.random.PRNGKey(run.seed + i),
                fps=float(fps[i]),
                shift=run.objective.shift_ratio,
                velocity_fn=velocity,
            )
            out.append(np.asarray(z)[0])
        path = os.path.join(self.workdir, "samples", f"step_{step:08d}.safetensors")
        save_atomic(
            {"latents": np.stack(out), "y": y, "mask": mask}, path, metadata={"step": str(step), "weights": "ema"}
        )
        return path


def train(config, workdir: str) -> dict:
    """Run (or resume) training of a run config (a RunConfig or the ml_collections dict of one);
    returns the driver's summary plus the final `state`."""
    compilation_cache.setup(compilation_cache.workdir_cache_dir(workdir))
    run = as_run_config(config)
    task = tasks.for_config(run)
    resolved = run.resolved()
    backend = JaxBackend(run, workdir, task, resolved)
    summary = driver.run(run.loop(), workdir, backend, task, resolved=resolved)
    summary["state"] = backend.state
    return summary
