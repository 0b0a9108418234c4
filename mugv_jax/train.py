"""Train MUG-DiT with JAX: `python -m mugv_jax.train --config=configs/tiny.py --workdir=DIR`.

Configs are Python files returning an ml_collections ConfigDict (`--config=configs/mugv_10b.py:video_720`
picks a stage), overridable per field (`--config.optim.learning_rate=3e-5`). `--workdir` holds
checkpoints/, tensorboard/ (event files + metrics.jsonl) and config.json. Re-running the same
command resumes from the newest readable checkpoint. SIGTERM saves at the next step boundary and
exits 0. Multi-host: run the same command on every host (jax.distributed is initialised from the
environment when `--distributed` is set).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import jax
import numpy as np

from mugv import flops as flops_lib
from mugv.config import DiTConfig
from mugv.geometry import num_video_tokens
from mugv.training import dataclass_from as _dataclass_from, model_config_from  # noqa: F401
from mugv_jax import checkpointing, data as data_lib, mesh as mesh_lib, objective as obj
from mugv_jax import trainer as trainer_lib
from mugv_jax import validation
from mugv_jax.dit.model import RuntimeOptions
from mugv_jax.metrics import MetricsWriter

log = logging.getLogger("mugv.train")


class NonFiniteLossError(RuntimeError):
    pass


def build_iterator(config, model_cfg: DiTConfig):
    """The batch iterator for config.data: `next()` gives a batch (dict of numpy arrays with
    latents/y/mask/fps), `get_state()`/`set_state()` make its position part of a checkpoint.

    `synthetic` yields the global batch on every process; `shards` (array_record shards written by
    `python -m mugv_data prepare`) yields this process's slice (`returns_local`).
    With config.data.mix on, images and video are mixed by an annealed ratio (MixedLoader)."""
    d = config.data
    mix = d.get("mix")
    if mix is not None and (float(mix.image_fraction_start) > 0 or float(mix.image_fraction_end) > 0):
        return _image_video_iterator(config, model_cfg)
    if d.source != "shards":
        return data_lib.DataIterator(build_source(config, model_cfg))
    from mugv_data.loader import ShardLoader
    if not d.get("path"):
        raise ValueError("config.data.source='shards' needs config.data.path (a prepared dataset directory)")
    loader = ShardLoader(d.path, int(d.batch_size), text_len=int(d.text_len), seed=int(config.seed),
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         num_workers=int(d.get("num_workers", 0)))
    if (loader.latent_channels, loader.text_dim) != (model_cfg.in_channels, model_cfg.text_dim):
        raise ValueError(f"dataset {d.path} has {loader.latent_channels} latent channels and text width "
                         f"{loader.text_dim}; model {config.model} expects {model_cfg.in_channels} and "
                         f"{model_cfg.text_dim} (set config.model_overrides.text_dim)")
    loader.returns_local = True
    return loader


def image_fraction(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Linear anneal of the image share from `start` to `end` over `anneal_steps`, then constant."""
    if anneal_steps <= 0:
        return float(end)
    return float(start + (end - start) * min(max(step, 0), anneal_steps) / anneal_steps)


def _image_video_iterator(config, model_cfg: DiTConfig):
    """MixedLoader over [images, video]: the image child is the data config with the image buckets
    (synthetic) or image dataset (shards); weights follow `image_fraction(step)`."""
    from mugv_data.loader import MixedLoader
    mix = config.data.mix
    for name in ("image_fraction_start", "image_fraction_end"):
        if not 0.0 <= float(mix[name]) <= 1.0:
            raise ValueError(f"config.data.mix.{name} must be in [0, 1], got {mix[name]}")
    video_cfg = config.copy_and_resolve_references()
    video_cfg.data.mix.image_fraction_start = video_cfg.data.mix.image_fraction_end = 0.0
    image_cfg = video_cfg.copy_and_resolve_references()
    if config.data.source == "shards":
        if not mix.image_path:
            raise ValueError("config.data.mix.image_path must name the prepared image dataset")
        image_cfg.data.path = mix.image_path
    else:
        if not mix.image_buckets:
            raise ValueError("config.data.mix.image_buckets must list (1, h, w, batch) image buckets")
        bad = [b for b in mix.image_buckets if int(b[0]) != 1]
        if bad:
            raise ValueError(f"config.data.mix.image_buckets must have 1 latent frame, got {bad}")
        image_cfg.data.buckets = tuple(tuple(b) for b in mix.image_buckets)
    start, end, steps = float(mix.image_fraction_start), float(mix.image_fraction_end), int(mix.anneal_steps)

    def weights(step):
        f = image_fraction(step, start, end, steps)
        return (f, 1.0 - f)

    return MixedLoader([build_iterator(image_cfg, model_cfg), build_iterator(video_cfg, model_cfg)],
                       weights, seed=int(config.seed))


def build_source(config, model_cfg: DiTConfig):
    d = config.data
    buckets = [data_lib.Bucket(*map(int, b)) for b in d.buckets]
    if d.source == "synthetic":
        return data_lib.SyntheticTextToLatent(
            buckets, in_channels=model_cfg.in_channels, text_dim=model_cfg.text_dim,
            text_len=int(d.text_len), num_prompts=int(d.num_prompts), fps=float(d.fps), seed=int(config.seed))
    raise ValueError(f"config.data.source={d.source!r} is not available (known: 'synthetic')")


def _init_params_from(spec: str, model_cfg: DiTConfig, weights: str = "raw"):
    """Initial parameters from `jax:DIR[@STEP]` (an orbax checkpoint, e.g. written by
    `python -m converters convert`) or a release-layout file (.pt / .safetensors)."""
    if spec.startswith("jax:"):
        from mugv_jax.orbax_params import load_params as jax_params
        found, params = jax_params(spec, weights=weights)
        if found != model_cfg:
            raise ValueError(f"config.init_from={spec} holds a {found} model, but the run's model is {model_cfg}")
        return params
    from flax import nnx
    from mugv_jax import dit
    model = dit.load(spec.removeprefix("release:"), model_cfg, progress=True)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _write_samples(state, captions: dict, config, model_cfg, options, workdir: str, step: int) -> str:
    """Sample latents from the EMA weights for fixed training captions (null caption as negative)
    and write them to <workdir>/samples/step_XXXXXXXX.safetensors."""
    from mugv_jax import sampler
    from mugv_jax.safetensors_io import save_atomic
    velocity = sampler.make_guided_velocity_from_params(state["ema"], model_cfg, options)
    null = np.asarray(jax.device_get(state["null_text"]))
    f, h, w = captions["latent_shape"]
    out = []
    for i in range(captions["y"].shape[0]):
        length = captions["y"].shape[2]
        z = sampler.sample(None, np.zeros((1, model_cfg.in_channels, f, h, w), np.float32),
                           captions["y"][i:i + 1], captions["mask"][i:i + 1], null[None, None, :length],
                           np.ones((1, length), np.int32), height=h * 8, width=w * 8,
                           num_steps=int(config.sample.steps), guidance_scale=float(config.sample.cfg_scale),
                           key=jax.random.PRNGKey(int(config.seed) + i), fps=float(captions["fps"][i]),
                           shift=config.objective.get("shift_ratio"), velocity_fn=velocity)
        out.append(np.asarray(z)[0])
    path = os.path.join(workdir, "samples", f"step_{step:08d}.safetensors")
    save_atomic({"latents": np.stack(out), "y": captions["y"], "mask": captions["mask"]}, path,
                metadata={"step": str(step), "weights": "ema"})
    return path


def _local_batch(batch: dict, already_local: bool) -> dict:
    """This process's share of a global host batch (every process builds the same global batch)."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1 or already_local:
        return batch
    return {k: np.array_split(v, n)[i] for k, v in batch.items()}


def train(config, workdir: str) -> dict:
    """Run (or resume) training; returns a summary {step, loss, skipped, stopped_by}."""
    if config.get("mode", "pretrain") == "preference":
        from mugv_jax import preference
        return preference.train_preference(config, workdir)
    if config.get("mode", "pretrain") != "pretrain":
        raise ValueError(f"config.mode must be 'pretrain' or 'preference', got {config.mode!r}")
    model_cfg = model_config_from(config)
    options = RuntimeOptions(compute_dtype=config.compute_dtype, attention=config.attention, remat=config.remat)
    optim = _dataclass_from(trainer_lib.OptimConfig, config.optim)
    objective = _dataclass_from(obj.ObjectiveConfig, config.objective)
    mesh = mesh_lib.build_mesh(dict(config.mesh.ici), dict(config.mesh.get("dcn", {}) or {}))
    trainer = trainer_lib.Trainer(model_cfg, options, optim, objective, mesh)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    resolved = json.loads(config.to_json_best_effort())
    resolved["model_resolved"] = model_cfg.to_dict()
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
    log.info("%s; model %s (%d layers, hidden %d)", mesh_lib.describe(mesh), config.model,
             model_cfg.depth, model_cfg.hidden_size)

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.keep_checkpoints),
                                      use_async=bool(config.async_checkpoint))
    restored = ckpt.restore_latest(trainer.abstract_state())
    it = build_iterator(config, model_cfg)
    if restored is not None:
        step0, state, data_state, _ = restored
        it.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, step0)
    else:
        params = (_init_params_from(config.init_from, model_cfg, config.get("init_weights", "raw"))
                  if config.init_from else None)
        if config.init_from:
            log.info("initialised from %s (%s weights) with a fresh optimizer", config.init_from,
                     config.get("init_weights", "raw"))
        state = trainer.init_state(int(config.seed), params)
    step = int(jax.device_get(state["step"]))

    writer = MetricsWriter(os.path.join(workdir, "tensorboard"), enabled=is_main)
    device_kind = jax.devices()[0].device_kind
    peak = flops_lib.peak_flops_for(device_kind)
    n_dev = mesh.size
    stop = {"signal": None}
    prev_handler = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))

    def save(force=False):
        ckpt.save(step, state, it.get_state(), {**resolved, "model": model_cfg.to_dict()}, force=force)

    sample_every = int(config.sample.every)
    validator = validation.from_config(config, trainer)
    val_every = int(config.validation.every) if validator is not None else 0
    val_weights = str(config.validation.get("weights", "ema")) if validator is not None else "ema"
    if val_weights not in ("ema", "raw"):
        raise ValueError(f"config.validation.weights must be 'ema' or 'raw', got {val_weights!r}")

    def validate():
        vals = validator.evaluate(state["params" if val_weights == "raw" else "ema"])
        writer.write(step, vals)
        log.info("step %d: validation loss %.5f (%s weights)", step, vals["val/loss"], val_weights)
        return vals

    captions = None
    total = int(config.num_steps)
    summary = {"step": step, "loss": None, "skipped": 0, "stopped_by": "num_steps"}
    window_t, window_steps = time.perf_counter(), 0
    profiling = False
    try:
        if validator is not None and restored is None:
            validate()  # the starting point of the curve
        while step < total:
            if config.profile.start_step >= 0 and step == config.profile.start_step and is_main:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                profiling = True
            host_batch = next(it)
            host_batch.pop("prompt_id", None)
            if captions is None and sample_every > 0:
                n = int(config.sample.count)
                captions = {"y": host_batch["y"][:n], "mask": host_batch["mask"][:n],
                            "fps": host_batch["fps"][:n], "latent_shape": host_batch["latents"].shape[2:]}
            returns_local = getattr(it, "returns_local", False)
            batch_size = host_batch["latents"].shape[0] * (jax.process_count() if returns_local else 1)
            latent_shape = host_batch["latents"].shape[2:]
            batch = trainer.put_batch(_local_batch(host_batch, returns_local))
            state, metrics = trainer.train_step(state, batch)
            step += 1
            window_steps += 1
            if profiling and step >= config.profile.start_step + config.profile.num_steps:
                jax.profiler.stop_trace()
                profiling = False
            if step % int(config.log_every) == 0 or step == total:
                m = jax.device_get(metrics)
                dt = (time.perf_counter() - window_t) / window_steps
                n_tokens = num_video_tokens(tuple(latent_shape), model_cfg)
                text_tokens = host_batch["y"].shape[2]
                sf = flops_lib.step_flops(model_cfg, batch_size, n_tokens, text_tokens)
                scalars = {
                    "loss": m["loss"], "grad_norm": m["grad_norm"], "learning_rate": m["learning_rate"],
                    "step_time": dt, "samples_per_second": batch_size / dt,
                    "tokens_per_second": batch_size * n_tokens / dt,
                    "tflops_per_device": sf.train / dt / n_dev / 1e12,
                    "mfu": flops_lib.mfu(sf.train, dt, n_dev, peak),
                    "skipped_steps": int(jax.device_get(state["skipped"])),
                }
                for q, v in enumerate(m["loss_by_t_quartile"]):
                    scalars[f"loss_by_t/q{q}"] = v
                writer.write(step, scalars)
                writer.console(step, total, scalars)
                summary.update(loss=float(m["loss"]), skipped=scalars["skipped_steps"])
                window_t, window_steps = time.perf_counter(), 0
            nonfinite = int(jax.device_get(metrics["nonfinite_in_a_row"]))
            if nonfinite:
                log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, nonfinite)
                if nonfinite >= int(config.max_nonfinite_in_a_row):
                    raise NonFiniteLossError(
                        f"{nonfinite} non-finite steps in a row (limit config.max_nonfinite_in_a_row="
                        f"{config.max_nonfinite_in_a_row}) at step {step}; last good checkpoint under "
                        f"{ckpt.directory}")
            if stop["signal"] is not None:
                log.warning("SIGTERM received: saving step %d and exiting", step)
                save(force=True)
                summary["stopped_by"] = "sigterm"
                break
            if step % int(config.checkpoint_every) == 0 or step == total:
                save()
            if val_every > 0 and (step % val_every == 0 or step == total):
                summary["validation"] = validate()
            if sample_every > 0 and (step % sample_every == 0 or step == total) and is_main:
                path = _write_samples(state, captions, config, model_cfg, options, workdir, step)
                log.info("step %d: wrote samples %s", step, path)
        summary["step"] = step
        summary["skipped"] = int(jax.device_get(state["skipped"]))
        ckpt.wait()
    finally:
        signal.signal(signal.SIGTERM, prev_handler)
        if profiling:
            jax.profiler.stop_trace()
        writer.close()
        ckpt.close()
    summary["state"] = state
    return summary


def main(argv):
    from absl import flags
    FLAGS = flags.FLAGS
    if FLAGS.distributed or FLAGS.coordinator_address:
        from mugv_jax import distributed
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    summary = train(FLAGS.config, FLAGS.workdir)
    print(f"finished at step {summary['step']} ({summary['stopped_by']}); last loss {summary['loss']}; "
          f"skipped steps {summary['skipped']}; workdir {FLAGS.workdir}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, logs and samples go here")
    flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize(); with no "
                      "other flag JAX detects the cluster (TPU pod, Slurm srun)")
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 "
                        "(or MUGV_COORDINATOR_ADDRESS); implies --distributed")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes (or MUGV_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index (or MUGV_PROCESS_ID)")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
