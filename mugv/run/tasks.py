"""The kinds of DiT run the driver knows, framework-free: pretraining (rectified flow) and
preference optimisation (DPO/KTO on labelled clips). Each says where its batches come from, what
a logged step shows and how the run is evaluated; the backends do the math.
"""

from __future__ import annotations

import os

from mugv import flops as flops_lib
from mugv.data import preference as pref_data
from mugv.geometry import num_video_tokens
from mugv.run import data as run_data
from mugv.run import validation
from mugv.run.config import RunConfig, as_run_config
from mugv.run.data import ShardSlice

MODEL_KEYS = ("latents", "y", "mask", "fps", "frame_indice")


class _ModelKeys:
    """Drops the keys a batch carries for bookkeeping (prompt ids, bucket ids) before the model."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: v for k, v in next(self.inner).items() if k in MODEL_KEYS}

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def close(self):
        if hasattr(self.inner, "close"):
            self.inner.close()


def _fmt(s: dict, key: str, spec: str, suffix: str = "") -> str | None:
    v = s.get(key)
    return None if v is None else f"{key.split('/')[-1]} {format(v, spec)}{suffix}"


class PretrainTask:
    name = "pretrain"
    log_dir = "tensorboard"

    def __init__(self, run: RunConfig):
        self.run = run
        self.model_cfg = run.model_config

    def iterator(self, shard):
        return _ModelKeys(run_data.build_iterator(self.run, self.model_cfg, shard))

    def evaluation(self):
        return validation.from_config(self.run, self.model_cfg)

    def evaluate_every(self) -> int:
        return self.run.validation.every

    def scalars(self, batch: dict, fetched: dict, seconds: float, backend) -> dict:
        b = batch["latents"].shape[0] * backend.data_shard[1]
        n_tokens = num_video_tokens(tuple(batch["latents"].shape[2:]), self.model_cfg)
        text_tokens = batch["y"].shape[2]
        sf = flops_lib.step_flops(self.model_cfg, b, n_tokens, text_tokens)
        hw = flops_lib.hardware_step_flops(self.model_cfg, b, n_tokens, text_tokens, backend.recompute).train
        peak = flops_lib.peak_flops_for(backend.device_kind)
        n_dev = backend.num_devices
        out = {
            "loss": fetched["loss"],
            "grad_norm": fetched["grad_norm"],
            "learning_rate": fetched["learning_rate"],
            "step_time": seconds,
            "samples_per_second": b / seconds,
            "tokens_per_second": b * n_tokens / seconds,
            "tflops_per_device": sf.train / seconds / n_dev / 1e12,
            "hardware_tflops_per_device": hw / seconds / n_dev / 1e12,
            "mfu": flops_lib.mfu(sf.train, seconds, n_dev, peak),
            "hfu": flops_lib.mfu(hw, seconds, n_dev, peak),
        }
        # A quartile no sample of the step fell in has no loss: logged as absent (None: left out of
        # TensorBoard, null in metrics.jsonl), not as 0.
        for q, (v, n) in enumerate(zip(fetched["loss_by_t_quartile"], fetched["loss_by_t_count"])):
            out[f"loss_by_t/q{q}"] = v if n > 0 else None
        return out

    def console(self, step: int, total: int, s: dict) -> str:
        parts = [
            f"step {step}/{total}",
            _fmt(s, "loss", ".4f"),
            _fmt(s, "grad_norm", ".3f"),
            _fmt(s, "learning_rate", ".2e"),
            _fmt(s, "step_time", ".3f", "s"),
            _fmt(s, "tokens_per_second", ",.0f"),
            _fmt(s, "tflops_per_device", ".2f"),
            None if s.get("mfu") is None else f"mfu {s['mfu']:.1%}",
        ]
        if s.get("skipped_steps"):
            parts.append(f"skipped {int(s['skipped_steps'])}")
        return " | ".join(p for p in parts if p)


class PreferenceEvaluation:
    """Held-out preference batches, each evaluated with the draws of key (seed, batch index)."""

    def __init__(self, batches: list[dict], seed: int):
        self.batches, self.seed = batches, int(seed)


class PreferenceTask:
    name = "preference"
    log_dir = "tensorboard"

    def __init__(self, run: RunConfig):
        self.run = run
        self.model_cfg = run.model_config

    def _iterator(self, labels_key: str, seed: int) -> pref_data.PreferenceIterator:
        p = self.run.preference
        path = getattr(p, labels_key)
        if not path:
            raise ValueError(
                f"--config.preference.{labels_key} must name a label JSONL file (configs/tiny_preference.py)"
            )
        clips = p.clips or os.path.join(os.path.dirname(os.path.abspath(path)), "clips")
        return pref_data.PreferenceIterator(
            pref_data.read_labels(path), pref_data.ClipStore(clips), p.batch_size, seed=seed
        )

    def iterator(self, shard):
        return ShardSlice(self._iterator("labels", self.run.seed), shard)

    def evaluation(self):
        p = self.run.preference
        if not p.heldout_labels:
            return None
        it = self._iterator("heldout_labels", p.heldout_seed)
        return PreferenceEvaluation([it.batch(i) for i in range(max(p.heldout_batches, len(it.names)))], p.heldout_seed)

    def evaluate_every(self) -> int:
        return self.run.preference.eval_every

    def scalars(self, batch: dict, fetched: dict, seconds: float, backend) -> dict:
        kind = pref_data.batch_kind(batch)
        out = {f"{kind}/{k}": float(v) for k, v in fetched.items() if k != "nonfinite_in_a_row"}
        out["loss"] = float(fetched["loss"])
        out["step_time"] = seconds
        return out

    def console(self, step: int, total: int, s: dict) -> str:
        return f"step {step}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(s.items()) if v is not None)


def for_config(config):
    """The task of a run config's `mode` (RunConfig validates it)."""
    run = as_run_config(config)
    return PreferenceTask(run) if run.mode == "preference" else PretrainTask(run)
