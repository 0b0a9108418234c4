"""The kinds of DiT run the driver knows, framework-free: pretraining (rectified flow) and
preference optimisation (DPO/KTO on labelled clips). Each says where its batches come from, what
a logged step shows and how the run is evaluated; the backends do the math.
"""

from __future__ import annotations

import os

from mugv import flops as flops_lib
from mugv.config import DiTConfig
from mugv.data import preference as pref_data
from mugv.geometry import num_video_tokens
from mugv.run import data as run_data
from mugv.run import validation
from mugv.run.data import ShardSlice
from mugv.training import model_config_from

MODES = ("pretrain", "preference")
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

    def __init__(self, config, model_cfg: DiTConfig | None = None):
        self.config = config
        self.model_cfg = model_cfg or model_config_from(config)

    def iterator(self, shard):
        return _ModelKeys(run_data.build_iterator(self.config, self.model_cfg, shard))

    def evaluation(self):
        return validation.from_config(self.config, self.model_cfg)

    def evaluate_every(self) -> int:
        return int(self.config.validation.every)

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
        for q, v in enumerate(fetched["loss_by_t_quartile"]):
            out[f"loss_by_t/q{q}"] = v
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

    def __init__(self, config, model_cfg: DiTConfig | None = None):
        self.config = config
        self.model_cfg = model_cfg or model_config_from(config)
        if "preference" not in config:
            raise ValueError(
                "config.mode='preference' needs a config.preference section (see configs/tiny_preference.py)"
            )

    def _iterator(self, labels_key: str, seed: int) -> pref_data.PreferenceIterator:
        p = self.config.preference
        path = p[labels_key]
        if not path:
            raise ValueError(f"config.preference.{labels_key} must name a label JSONL file")
        clips = p.clips or os.path.join(os.path.dirname(os.path.abspath(path)), "clips")
        return pref_data.PreferenceIterator(
            pref_data.read_labels(path), pref_data.ClipStore(clips), int(p.batch_size), seed=seed
        )

    def iterator(self, shard):
        return ShardSlice(self._iterator("labels", int(self.config.seed)), shard)

    def evaluation(self):
        p = self.config.preference
        if not p.heldout_labels:
            return None
        it = self._iterator("heldout_labels", int(p.heldout_seed))
        return PreferenceEvaluation(
            [it.batch(i) for i in range(max(int(p.heldout_batches), len(it.names)))], int(p.heldout_seed)
        )

    def evaluate_every(self) -> int:
        return int(self.config.preference.eval_every)

    def scalars(self, batch: dict, fetched: dict, seconds: float, backend) -> dict:
        kind = pref_data.batch_kind(batch)
        out = {f"{kind}/{k}": float(v) for k, v in fetched.items() if k != "nonfinite_in_a_row"}
        out["loss"] = float(fetched["loss"])
        out["step_time"] = seconds
        return out

    def console(self, step: int, total: int, s: dict) -> str:
        return f"step {step}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(s.items()) if v is not None)


def for_config(config, model_cfg: DiTConfig | None = None):
    mode = config.get("mode", "pretrain")
    if mode == "pretrain":
        return PretrainTask(config, model_cfg)
    if mode == "preference":
        return PreferenceTask(config, model_cfg)
    raise ValueError(f"config.mode must be one of {MODES}, got {mode!r}")
