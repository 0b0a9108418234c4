"""The VAE training run: `train_vae(config, workdir, clips=None)` (configs/vae_tiny.py, docs/vae.md).

The run-loop glue, like the DiT's mugv_jax/train/backend.py: VAETask and VAEBackend put the
Trainer (trainer.py) and the crop iterator (clips.py) under the loop every trainer uses
(mugv.run.driver): orbax checkpoints (`<workdir>/checkpoints/<step>/`), TensorBoard +
`<workdir>/logs/metrics.jsonl`, held-out evaluation at the start, every `eval_every` steps and at
the end, SIGTERM, non-finite steps (skipped inside the jitted step, counted, the run stopped after
a limit).

On completion the weights go to `<workdir>/vae.safetensors` in the release layout (loadable by
`mugv_jax.vae.load(path, vae_config)`), with the latent `shift`/`scale` buffers set to the
per-channel mean/std of the posterior means of training crops, so normalised latents have
roughly zero mean and unit variance.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

import jax
import numpy as np

from mugv.io.atomic import write_json
from mugv.run import driver
from mugv.run.config import LoopConfig
from mugv.vae_config import TEMPORAL_GROUP, VAEConfig, get_vae_config
from mugv_jax import compilation_cache
from mugv_jax.vae.clips import CropIterator, CropSampler, load_clips
from mugv_jax.vae.trainer import Trainer

log = logging.getLogger(__name__)

WEIGHTS_NAME = "vae.safetensors"
RESULT_NAME = "vae_result.json"


# --- configuration --------------------------------------------------------------------------------


def resolve_vae_config(config) -> VAEConfig:
    preset = config.vae_preset
    if isinstance(preset, str):
        return get_vae_config(preset)
    overrides = dict(preset)
    base = overrides.pop("preset", "tiny")
    for k in ("block_out_channels", "channel_multipliers", "temporal_downsample"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return get_vae_config(base, **overrides)


def _check(config, vae_cfg: VAEConfig) -> None:
    h, w = config.size
    if config.frames < TEMPORAL_GROUP or config.frames % TEMPORAL_GROUP:
        raise ValueError(f"config.frames={config.frames} must be a positive multiple of {TEMPORAL_GROUP}")
    if h % 8 or w % 8 or h < 8 or w < 8:
        raise ValueError(f"config.size={tuple(config.size)} must be positive multiples of 8")
    if config.batch_size < 1 or config.num_steps < 0:
        raise ValueError(f"config.batch_size={config.batch_size} / num_steps={config.num_steps} invalid")
    bad = [n for n in config.decoder_windows if n < 1]
    if bad:
        raise ValueError(f"config.decoder_windows must be positive, got {tuple(config.decoder_windows)}")


# --- the run: a task and a backend for mugv.run.driver --------------------------------------------


def _flat(tree) -> dict[str, object]:
    # Orbax wants string keys; the param dicts have int keys (nnx.List indices). Leaves in
    # treedef order are unambiguous given the same config, which the restore side rebuilds.
    return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflat(template, flat: dict) -> object:
    leaves = [flat[k] for k in sorted(flat)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


class VAETask:
    """VAE training as a run of the shared driver: crop batches, reconstruction metrics, held-out
    PSNR/SSIM as the evaluation."""

    name = "vae"
    log_dir = "logs"

    def __init__(self, config, sampler: CropSampler, eval_x: np.ndarray):
        self.config, self.sampler, self.eval_x = config, sampler, eval_x

    def iterator(self, shard):
        if shard != (0, 1):
            raise ValueError("VAE training runs in one process (its batches are sharded over the local devices)")
        return CropIterator(self.config, self.sampler)

    def evaluation(self):
        return self.eval_x

    def evaluate_every(self) -> int:
        return int(self.config.eval_every)

    def scalars(self, batch: dict, fetched: dict, seconds: float, backend) -> dict:
        out = {f"train/{k}": v for k, v in fetched.items()}
        out.update({"loss": fetched["loss"], "train/step_time": seconds})
        return out

    def console(self, step: int, total: int, s: dict) -> str:
        parts = [
            f"vae step {step}/{total}",
            f"loss {s['loss']:.4f}",
            f"rec {s.get('train/rec', float('nan')):.4f}",
            f"{s['train/step_time']:.2f}s/step",
        ]
        return " | ".join(parts)


class VAEBackend:
    """The VAE Trainer behind the driver's backend interface (JAX, one process)."""

    name = "jax"
    first_step_note = "compiling the step (first step only)…"
    is_main = True
    data_shard = (0, 1)
    recompute = "none"

    def __init__(self, config, trainer: Trainer, workdir: str, run_config: dict):
        from mugv_jax.train.checkpointing import Checkpointer

        self.config, self.trainer, self.run_config = config, trainer, run_config
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, use_async=False)
        self.checkpoint_dir = self.ckpt.directory
        self.num_devices = jax.device_count()
        self.device_kind = jax.devices()[0].device_kind
        self.step = 0
        self.before: dict | None = None
        self._nonfinite = 0

    def restore(self):
        restored = self.ckpt.restore_latest(_flat(self.trainer.tree()))
        if restored is None:
            return None
        step, flat, data_state, _ = restored
        self.trainer.set_tree(_unflat(self.trainer.tree(), flat))
        self.trainer.step = self.step = step
        self.before = {"eval/psnr": data_state.pop("psnr_before"), "eval/ssim": data_state.pop("ssim_before")}
        return {"step": step, **data_state}

    def initialize(self) -> None:
        pass  # the Trainer starts from config.init_from or a random VAE

    def train_step(self, batch: dict):
        s, w = self.trainer.step, self.config.loss
        key = jax.random.fold_in(jax.random.key(self.config.seed), s)
        sal = 1.0 if 0 <= w.saliency_start_step <= s else 0.0
        gan_on = 1.0 if self.trainer.use_gan and s >= w.gan_start_step else 0.0
        terms = self.trainer.train_step(batch["x"], batch["window"], key, sal, gan_on)
        self.trainer.step = self.step = s + 1
        finite = bool(jax.device_get(terms.pop("finite")))
        self._nonfinite = 0 if finite else self._nonfinite + 1
        return terms

    def fetch(self, terms) -> dict:
        return {k: float(v) for k, v in jax.device_get(terms).items()}

    def nonfinite_in_a_row(self, terms) -> int:
        return self._nonfinite

    def skipped(self) -> int:
        return 0

    def evaluate(self, eval_x) -> dict:
        ev = self.trainer.evaluate(eval_x)
        vals = {"eval/psnr": ev["psnr"], "eval/ssim": ev["ssim"]}
        if self.before is None:
            self.before = dict(vals)
        return vals

    def save(self, data_state: dict, *, force: bool = False) -> None:
        extra = {"psnr_before": self.before["eval/psnr"], "ssim_before": self.before["eval/ssim"]}
        self.ckpt.save(self.step, _flat(self.trainer.tree()), {**data_state, **extra}, self.run_config, force=True)

    def checkpoints(self) -> list[str]:
        return [os.path.join(self.ckpt.directory, str(s)) for s in self.ckpt.steps()]

    def any_process(self, flag: bool) -> bool:
        return flag

    def finish(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None


# --- entry point ----------------------------------------------------------------------------------


def train_vae(config, workdir: str, clips: Iterable[np.ndarray] | None = None, progress: bool = True) -> dict:
    """Train (or resume) a VAE; returns {"weights", "vae_config", "psnr_before", "psnr_after",
    "ssim_before", "ssim_after", "steps", "skipped_videos", "shift", "scale"}.

    Resumes from `<workdir>/checkpoints`; a finished run (its weights and result file present,
    `steps` done) returns its stored result without building anything. The loop is the shared run
    driver's (mugv.run.driver: checkpoints, logs, evaluation cadence, SIGTERM, non-finite steps);
    progress is its console line every `log_every` steps (`progress` is kept for callers).
    """
    vae_cfg = resolve_vae_config(config)
    _check(config, vae_cfg)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    compilation_cache.setup(compilation_cache.workdir_cache_dir(workdir))
    weights = os.path.join(workdir, WEIGHTS_NAME)
    result_path = os.path.join(workdir, RESULT_NAME)
    if os.path.isfile(result_path) and os.path.isfile(weights):
        with open(result_path) as f:
            done = json.load(f)
        if done.get("steps") == config.num_steps and done.get("vae_config") == vae_cfg.to_dict():
            done["vae_config"] = vae_cfg
            return done

    data, failures = load_clips(config, clips)
    sampler = CropSampler(
        data,
        config.frames,
        tuple(config.size),
        config.data.holdout_fraction,
        config.data.get("holdout_clips", 0),
        config.data.get("first_frame", False),
    )
    eval_x = sampler.eval_set(config.data.eval_clips)
    if eval_x is None:
        log.warning(
            "clips too short to hold out %s of their frames; evaluating on training crops", config.data.holdout_fraction
        )
        eval_x = sampler.batch(np.random.default_rng([config.seed, 2**31 - 2]), config.data.eval_clips)

    trainer = Trainer(config, vae_cfg)
    config_json = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else {}
    config_json["vae_config"] = vae_cfg.to_dict()
    backend = VAEBackend(config, trainer, workdir, config_json)
    try:
        loop = LoopConfig(
            num_steps=config.num_steps, log_every=config.log_every, checkpoint_every=config.checkpoint_every
        )
        summary = driver.run(loop, workdir, backend, VAETask(config, sampler, eval_x), resolved=config_json)
    finally:
        backend.finish()
    before = backend.before["eval/psnr"], backend.before["eval/ssim"]
    last = summary["evaluations"][-1] if summary["evaluations"] else None
    after = (
        {"psnr": last["eval/psnr"], "ssim": last["eval/ssim"]}
        if last and last["step"] == trainer.step
        else trainer.evaluate(eval_x)
    )
    shift, scale = trainer.latent_stats(sampler, config.data.stats_batches, config.seed)
    trainer.export(weights, shift, scale)
    write_json(os.path.join(workdir, "vae_config.json"), vae_cfg.to_dict(), indent=1)

    result = {
        "weights": weights,
        "vae_config": vae_cfg.to_dict(),
        "psnr_before": before[0],
        "psnr_after": after["psnr"],
        "ssim_before": before[1],
        "ssim_after": after["ssim"],
        "steps": trainer.step,
        "skipped_videos": [list(f) for f in failures],
        "shift": shift.tolist(),
        "scale": scale.tolist(),
    }
    write_json(result_path, result, indent=1)
    result["vae_config"] = vae_cfg
    return result


# --- a run's checkpoints, read back as release weights --------------------------------------------


class RunWeights:
    """The VAE weights of one step of a training run (`<workdir>/checkpoints/<step>/`, newest
    unless `step`), in release names, one tensor at a time (`python -m converters convert --src
    jax:WORKDIR`). The checkpoint stores the trainer's tree as flat leaves (`_flat`): its sorted
    keys put `params` last, in the order of the abstract model's Param tree; the latent
    `shift`/`scale` buffers are not trained, and come from the run's result file (written when the
    run finishes, for its last step)."""

    def __init__(self, path: str, step: int | None = None):
        from mugv.io import orbax as orbax_io
        from mugv_jax.vae.checkpoint import abstract_params

        self.path = path
        step_dir, self.step, _ = orbax_io.resolve_step_dir(path, step)
        self.location = step_dir
        run = orbax_io.read_config_item(step_dir) or {}
        if not isinstance(run.get("vae_config"), dict):
            raise ValueError(f"{step_dir}: not a VAE training checkpoint (its config item has no 'vae_config')")
        self.config = VAEConfig.from_dict(run["vae_config"])
        state_dir = os.path.join(step_dir, orbax_io.STATE)
        keys = sorted(".".join(k) for k in orbax_io.state_entries(state_dir))
        params = abstract_params(self.config)
        if len(keys) < len(params):
            raise ValueError(f"{step_dir}: {len(keys)} stored arrays, fewer than the VAE's {len(params)} parameters")
        names = dict(zip(params, keys[len(keys) - len(params) :]))
        self._arrays = orbax_io.open_state_arrays(state_dir, list(names.values()))
        self._key = names
        bad = [
            f"{n}: {list(self._arrays[k].shape)} stored, the VAE has {list(params[n])}"
            for n, k in names.items()
            if tuple(self._arrays[k].shape) != tuple(params[n])
        ]
        if bad:
            raise ValueError(f"{step_dir} does not hold this run's VAE ({self.config}):\n  " + "\n  ".join(bad[:20]))
        workdir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
        result = os.path.join(workdir, RESULT_NAME)
        stats = None
        if os.path.isfile(result):
            with open(result) as f:
                done = json.load(f)
            if done.get("steps") == self.step:
                stats = done
        if stats is None:
            raise ValueError(
                f"{step_dir}: the latent shift/scale of step {self.step} are not known: they are measured "
                f"when the run finishes ({result}, for its last step). Finish the run (python -m mugv_jax.vae "
                f"train ... --workdir={workdir}) and convert its last step, or convert {WEIGHTS_NAME}"
            )
        c = self.config.embed_dim
        self._buffers = {
            "shift": np.asarray(stats["shift"], np.float32).reshape(1, c, 1, 1, 1),
            "scale": np.asarray(stats["scale"], np.float32).reshape(1, c, 1, 1, 1),
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{release name: shape} of every tensor, in release order."""
        from mugv.vae_config import release_vae_schema

        stored = {n: tuple(self._arrays[k].shape) for n, k in self._key.items()}
        stored.update({n: b.shape for n, b in self._buffers.items()})
        return {n: stored[n] for n in release_vae_schema(self.config) if n in stored}

    def get(self, name: str) -> np.ndarray:
        if name in self._buffers:
            return self._buffers[name]
        if name not in self._key:
            raise KeyError(f"{self.location}: no tensor {name!r}")
        return np.asarray(self._arrays[self._key[name]].read().result())
