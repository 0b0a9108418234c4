"""Validation loss at fixed timesteps on a held-out set with fixed noise (MLPerf-style), the
framework-free half: which batches, which noise, which timesteps, how results are named.

The training loss is noisy: every step draws new timesteps, noise, conditioning frames and caption
dropout. Validation removes all of that: a fixed list of held-out batches, one fixed noise tensor
per batch (drawn from (seed, batch index)), every batch evaluated at each t in `t_values` (fractions
of the 0..1000 range, no shift applied: the buckets are the timesteps themselves), every frame
generated and no caption dropout. The result is a deterministic function of the parameters, so
curves from different runs, checkpoints and backends are comparable, and it is what the post-hoc
EMA sweep minimises. A backend only computes the mean velocity MSE of a batch at each t.

Config (`config.validation`): every (steps; 0 = off), num_batches, t_values, seed, weights ("ema" or
"raw"), path (shards: a held-out prepared dataset; synthetic: batches far past the training
indices, i.e. fresh caption draws).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mugv.config import DiTConfig
from mugv.data.loader import ShardLoader
from mugv.run import data as run_data
from mugv.run.config import DEFAULT_T_VALUES, as_run_config

# Synthetic held-out batches start here: far from any index a training run reaches.
SYNTHETIC_OFFSET = 1_000_000_000
MODEL_KEYS = ("latents", "y", "mask", "fps")


def t_key(t: float) -> str:
    return f"val/t{t:.2f}"


@dataclasses.dataclass
class ValidationSet:
    """Held-out global batches (latents, y, mask, fps and a fixed `noise`), the timesteps, and
    which weights to evaluate."""

    batches: list[dict]
    t_values: tuple[float, ...] = DEFAULT_T_VALUES
    weights: str = "ema"

    def __post_init__(self):
        if not self.batches:
            raise ValueError("validation needs at least one held-out batch (config.validation.num_batches)")
        bad = [t for t in self.t_values if not 0.0 <= float(t) <= 1.0]
        if bad or not self.t_values:
            raise ValueError(f"config.validation.t_values must be fractions in [0, 1], got {list(self.t_values)}")
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"config.validation.weights must be 'ema' or 'raw', got {self.weights!r}")
        self.t_values = tuple(float(t) for t in self.t_values)

    def summarize(self, per_t: Sequence[float]) -> dict[str, float]:
        """{"val/loss": mean over t, "val/t0.10": ..., ...} from the per-t means over batches."""
        per_t = np.asarray(per_t, np.float64)
        out = {"val/loss": float(per_t.mean())}
        out.update({t_key(t): float(v) for t, v in zip(self.t_values, per_t)})
        return out


def with_noise(batches: Sequence[dict], seed: int) -> list[dict]:
    out = []
    for i, b in enumerate(batches):
        b = {k: np.asarray(v) for k, v in b.items() if k in MODEL_KEYS}
        noise = np.random.default_rng([int(seed), i]).standard_normal(b["latents"].shape).astype(np.float32)
        out.append({**b, "noise": noise})
    return out


def heldout_batches(config, model_cfg: DiTConfig) -> list[dict]:
    """The held-out batches a run's config describes (see the module docstring), without noise."""
    run = as_run_config(config)
    v, n = run.validation, run.validation.num_batches
    if run.data.source == "shards" or v.path:
        if not v.path:
            raise ValueError(
                "--config.validation.path must name a held-out prepared dataset when --config.data.source='shards'"
            )
        loader = ShardLoader(
            v.path,
            run.data.batch_size,
            text_len=run.data.text_len,
            seed=v.seed,
            truncate_text=run.data.truncate_captions,
        )
        out = []
        for _ in range(n):
            b = next(loader)
            out.append({k: b[k] for k in MODEL_KEYS})
        loader.close()
        return out
    source = run_data.synthetic_source(run, model_cfg)
    return [{k: v_ for k, v_ in source.batch(SYNTHETIC_OFFSET + i).items() if k in MODEL_KEYS} for i in range(n)]


def from_config(config, model_cfg: DiTConfig) -> ValidationSet | None:
    """The run's validation set, or None when config.validation.every is 0."""
    run = as_run_config(config)
    v = run.validation
    if v.every <= 0:
        return None
    return ValidationSet(with_noise(heldout_batches(run, model_cfg), v.seed), t_values=v.t_values, weights=v.weights)
