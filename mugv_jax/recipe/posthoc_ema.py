"""Post-hoc EMA: exponentially decayed ensembles of saved checkpoints (the paper's "post-EMA").

    python -m mugv_jax.recipe.posthoc_ema --run WORKDIR --decays 0.9,0.99,0.999 --dst OUT

Given checkpoints θ_1..θ_n saved at steps s_1 < ... < s_n, decay γ gives
    θ̄(γ) = Σ_k w_k θ_k,   w_k = γ^(s_n − s_k) / Σ_j γ^(s_n − s_j).
With checkpoints every Δ steps this is the online EMA of decay γ (weights (1−γ)γ^(s_n−s)) sampled
at the saved steps and renormalised, so γ has the same meaning as `optim.ema_decay`, but it is
chosen *after* training: every γ of the sweep is scored by the run's fixed-noise validation loss
(mugv_jax/train/validation.py) and the best one is written. γ → 0 is the last checkpoint; γ → 1 is the
uniform average. docs/training_recipe.md compares this with the online EMA.
Each checkpoint is read once; the sweep keeps one float64 accumulator per decay.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np


def ema_weights(steps: Sequence[int], decay: float) -> np.ndarray:
    """Normalised weights w_k ∝ decay^(s_n − s_k) for checkpoints at `steps` (ascending)."""
    s = np.asarray(steps, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("post-hoc EMA needs at least one checkpoint step")
    if np.any(np.diff(s) <= 0):
        raise ValueError(f"checkpoint steps must be strictly increasing, got {list(steps)}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if decay == 0.0:
        w = (s == s[-1]).astype(np.float64)
    else:
        w = np.exp((s[-1] - s) * np.log(decay))
    return w / w.sum()


def combine(checkpoints: Iterable, steps: Sequence[int], decays: Sequence[float]) -> list:
    """[Σ_k w_k(γ) θ_k for γ in decays]; `checkpoints` yields the param pytrees in step order
    (read lazily, one at a time)."""
    weights = [ema_weights(steps, d) for d in decays]
    acc = None
    n = 0
    for k, params in enumerate(checkpoints):
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
        if acc is None:
            treedef = jax.tree.structure(params)
            acc = [[np.zeros_like(x) for x in leaves] for _ in decays]
        for a, w in zip(acc, weights):
            for i, x in enumerate(leaves):
                a[i] += w[k] * x
        n += 1
    if n != len(steps):
        raise ValueError(f"got {n} checkpoints for {len(steps)} steps")
    return [jax.tree.unflatten(treedef, [x.astype(np.float32) for x in a]) for a in acc]


def sweep(averages: Sequence, decays: Sequence[float], evaluate: Callable[[object], float]):
    """(best decay, best params, {decay: validation loss}) over the combined checkpoints."""
    losses = {float(d): float(evaluate(p)) for d, p in zip(decays, averages)}
    best = min(losses, key=losses.get)
    return best, averages[list(map(float, decays)).index(best)], losses


def _run_pieces(workdir: str):
    """(run config, Trainer) of a training workdir from its config.json."""
    from mugv.run.config import as_run_config
    from mugv_jax.train import backend as train_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--run {workdir}: no config.json (a workdir of python -m mugv_jax.train)")
    with open(path) as f:
        d = json.load(f)
    d.pop("model_resolved", None)
    run = as_run_config(d)
    return run, train_lib.build_trainer(run)


def main(argv=None) -> int:
    from tqdm import tqdm

    from mugv.io.atomic import write_json
    from mugv.io.orbax import resolve_step_dir
    from mugv.io.weights import load_params as jax_params
    from mugv.run import validation as run_validation
    from mugv_jax.recipe.expand import save_params
    from mugv_jax.train import validation

    p = argparse.ArgumentParser(prog="python -m mugv_jax.recipe.posthoc_ema", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="training workdir (reads checkpoints/ and config.json)")
    p.add_argument("--decays", default="0.5,0.9,0.99,0.999", help="comma-separated decays to sweep")
    p.add_argument("--weights", choices=("raw", "ema"), default="raw", help="which weights of each checkpoint")
    p.add_argument("--dst", required=True, help="where to write the best average (a JAX checkpoint)")
    p.add_argument("--num-batches", type=int, default=None, help="override config.validation.num_batches")
    a = p.parse_args(argv)
    decays = [float(x) for x in a.decays.split(",") if x.strip()]
    _, _, steps = resolve_step_dir(a.run, None)
    if not steps:
        p.error(f"--run {a.run}: give a workdir or checkpoints directory (several steps), not one step")
    run, trainer = _run_pieces(a.run)
    if a.num_batches:
        run = run.replace(validation=dataclasses.replace(run.validation, num_batches=a.num_batches))
    vset = run_validation.ValidationSet(
        run_validation.with_noise(run_validation.heldout_batches(run, trainer.model_config), run.validation.seed),
        t_values=run.validation.t_values,
    )
    validator = validation.Validator(trainer, vset)
    loaded = (
        jax_params(f"jax:{a.run}@{s}", weights=a.weights)[1]
        for s in tqdm(steps, desc="reading checkpoints", unit="ckpt")
    )
    averages = combine(loaded, steps, decays)
    best, params, losses = sweep(averages, decays, validator.evaluate_loss)
    for d, l in losses.items():
        print(f"decay {d}: validation loss {l:.6f}{'  <- best' if d == best else ''}")
    path = save_params(params, trainer.model_config, a.dst, step=int(steps[-1]))
    summary = {"steps": list(map(int, steps)), "losses": losses, "best_decay": best, "weights": a.weights}
    write_json(os.path.join(a.dst, "posthoc_ema.json"), summary)
    print(f"wrote {path} (decay {best}; use init_from=jax:{a.dst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
