"""Whole training state JAX (orbax, mugv_jax/train/checkpointing.py) ⇄ Megatron (torch_dist,
mugv_megatron/train/checkpointing.py): fp32 weights, Adam moments and update count, EMA, null caption,
step / non-finite / skipped counters and the data position.

    python -c "from converters.training_state import jax_to_megatron; \
               jax_to_megatron('runs/j/checkpoints', 'runs/m/checkpoints')"

Every tensor goes release layout in between (mugv/layouts/jax.py and megatron.py are pure
reshapes/transposes, so weights, both moments and the EMA convert bit-exactly; Adam's moments
are per element, so the same maps apply to them). Both optimizers are the same AdamW (optax
clip + adamw ≡ mugv_megatron.train.optim), so a run continues on the other backend where it stopped.
The random stream needs no carrying: both backends draw a step's numbers from mugv.rng with
the run's seed and the step count (the JAX state's `rng` word is the seed), so the converted run
draws exactly what the source run would have.

Both directions run in one process (JAX on one CPU device is enough; Megatron as a one-process
world at TP=1 — its checkpoint loads under any TP size).
"""

from __future__ import annotations

import numpy as np

from mugv.config import DiTConfig
from mugv.io import orbax
from mugv.layouts import jax as jax_layout
from mugv.layouts import megatron as mlayout
from mugv.training import ObjectiveConfig, OptimConfig


def jax_tree_to_release(tree, config: DiTConfig) -> dict[str, np.ndarray]:
    import jax

    flat = {k: np.asarray(jax.device_get(v)) for k, v in jax_layout.flatten(tree).items()}
    return dict(jax_layout.jax_to_release_all(flat, config))


def release_to_jax_tree(release: dict[str, np.ndarray], config: DiTConfig) -> dict:
    flat, stacks = {}, {}
    for name, array in release.items():
        path, layer, arr = jax_layout.release_to_jax(name, np.asarray(array), config)
        if layer is None:
            flat[path] = arr
        else:
            stacks.setdefault(path, [None] * config.depth)[layer] = arr
    for path, layers in stacks.items():
        missing = [i for i, a in enumerate(layers) if a is None]
        if missing:
            raise ValueError(f"{path}: layers {missing} are missing")
        flat[path] = np.stack(layers)
    return jax_layout.unflatten(flat)


def _adam_states(opt_state):
    """(ScaleByAdamState, ScaleByScheduleState) inside the JAX trainer's optax chain."""
    import optax

    found = {}

    def walk(node):
        if isinstance(node, optax.ScaleByAdamState):
            found["adam"] = node
        elif isinstance(node, optax.ScaleByScheduleState):
            found["schedule"] = node
        elif isinstance(node, (tuple, list)):
            for n in node:
                walk(n)

    walk(opt_state)
    if set(found) != {"adam", "schedule"}:
        raise ValueError(f"JAX optimizer state has no Adam/schedule state (found {sorted(found)})")
    return found["adam"], found["schedule"]


def _jax_trainer(run_config: dict, config: DiTConfig):
    import jax

    from mugv_jax.dit.model import RuntimeOptions
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.train import step as jtr

    mesh = mesh_lib.build_mesh(dict(data=1, fsdp=1, tensor=1, context=1), devices=jax.devices()[:1])
    return jtr.Trainer(
        config,
        RuntimeOptions(),
        OptimConfig(**run_config.get("optim", {})),
        ObjectiveConfig(**run_config.get("objective", {})),
        mesh,
    )


def _megatron_trainer(run_config: dict, config: DiTConfig, seed: int):
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train.step import Trainer

    if not parallel.is_initialized():
        parallel.setup(1)
    return Trainer(
        config,
        OptimConfig(**run_config.get("optim", {})),
        ObjectiveConfig(**run_config.get("objective", {})),
        seed=seed,
        use_megatron_optimizer=False,
    )


def _run_config(raw: dict) -> tuple[dict, DiTConfig]:
    cfg = dict(raw)
    model = DiTConfig.from_dict(cfg.get("model_resolved") or cfg["model"])
    return cfg, model


def jax_to_megatron(src: str, dst: str, step: int | None = None, keep: int = 3) -> str:
    """Convert the JAX training checkpoint at `src` (<workdir>/checkpoints, newest step unless
    `step`) into a Megatron training checkpoint under `dst`; returns its iteration directory."""
    import torch

    from mugv_jax.train.checkpointing import Checkpointer, read_config
    from mugv_megatron.train import checkpointing as mckpt

    run_cfg, config = _run_config(read_config(src, step))
    jtrainer = _jax_trainer(run_cfg, config)
    ck = Checkpointer(src, use_async=False)
    step = ck.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{src}: no JAX checkpoint")
    state, data, _ = ck.restore(step, jtrainer.abstract_state())
    ck.close()
    adam, sched = _adam_states(state["opt_state"])
    if int(adam.count) != int(sched.count):
        raise ValueError(f"{src}@{step}: Adam count {int(adam.count)} != schedule count {int(sched.count)}")
    seed = int(run_cfg.get("seed", 0))
    mt = _megatron_trainer(run_cfg, config, seed)
    parts = {
        k: mlayout.release_state_to_megatron(jax_tree_to_release(tree, config), config)
        for k, tree in (
            ("params", state["params"]),
            ("exp_avg", adam.mu),
            ("exp_avg_sq", adam.nu),
            ("ema", state["ema"]),
        )
    }
    with torch.no_grad():
        mt.optimizer.set_count(int(adam.count))
        for n, p in mt.module.named_parameters():
            p.copy_(torch.tensor(np.asarray(parts["params"][n])))
            moments = mt.optimizer.moments(p)
            moments["exp_avg"].copy_(torch.tensor(np.asarray(parts["exp_avg"][n])))
            moments["exp_avg_sq"].copy_(torch.tensor(np.asarray(parts["exp_avg_sq"][n])))
            mt.ema.shadow[n].copy_(torch.tensor(np.asarray(parts["ema"][n])))
        mt.null_text.copy_(torch.tensor(np.asarray(state["null_text"])))
    mt.set_counters(
        {
            "step": int(state["step"]),
            "nonfinite": int(state["nonfinite"]),
            "skipped": int(state["skipped"]),
            "seed": seed,
        }
    )
    return mckpt.save(dst, mt, dict(data), {**run_cfg, "converted_from": f"jax:{src}@{step}"}, keep=keep)


def megatron_to_jax(src: str, dst: str, run_config: dict | None = None) -> int:
    """Convert the newest Megatron training checkpoint under `src` into a JAX training checkpoint
    under `dst` (an orbax <workdir>/checkpoints directory); returns the step."""
    import jax
    import jax.numpy as jnp
    from megatron.core import dist_checkpointing

    from mugv_jax.train.checkpointing import Checkpointer
    from mugv_megatron.train import checkpointing as mckpt

    steps = mckpt.steps(src)
    if not steps:
        raise FileNotFoundError(f"{src}: no Megatron training checkpoint")
    meta = dist_checkpointing.load_common_state_dict(mckpt.iter_dir(src, steps[-1]))["mugv"]
    run_cfg = dict(run_config or meta.get("config") or {})
    config = DiTConfig.from_dict(meta["model"])
    run_cfg.setdefault("model_resolved", config.to_dict())
    mt = _megatron_trainer(run_cfg, config, int(run_cfg.get("seed", 0)))
    meta = mckpt.restore_latest(src, mt)
    named = dict(mt.module.named_parameters())
    grab = lambda f: mlayout.megatron_state_to_release(  # noqa: E731
        {n: f(n, p).detach().cpu().numpy() for n, p in named.items()}, config
    )
    release = {
        "params": grab(lambda n, p: p),
        "ema": grab(lambda n, p: mt.ema.shadow[n]),
        "mu": grab(lambda n, p: mt.optimizer.moments(p)["exp_avg"]),
        "nu": grab(lambda n, p: mt.optimizer.moments(p)["exp_avg_sq"]),
    }
    trees = {k: release_to_jax_tree(v, config) for k, v in release.items()}
    jtrainer = _jax_trainer(run_cfg, config)
    abstract = jtrainer.abstract_state()
    count = jnp.asarray(mt.optimizer.count, jnp.int32)

    def fill(node):
        import optax

        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(count=count, mu=trees["mu"], nu=trees["nu"])
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=count)
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(fill(n) for n in node)
        return node

    opt_state = fill(jtrainer.optimizer.init(trees["params"]))
    state = {
        "params": trees["params"],
        "opt_state": opt_state,
        "ema": trees["ema"],
        "null_text": mt.null_text.cpu().numpy(),
        "step": np.int32(mt.step),
        "rng": np.asarray([int(run_cfg.get("seed", 0)), 0], np.uint32),
        "nonfinite": np.int32(mt.nonfinite),
        "skipped": np.int32(mt.skipped),
    }
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    state = jax.device_put(jax.tree.map(lambda v, a: jnp.asarray(v, a.dtype), state, abstract), shardings)
    ck = Checkpointer(dst, use_async=False)
    ck.save(mt.step, state, dict(meta["data"]), orbax.config_item(config, run_cfg), force=True)
    ck.close()
    return mt.step
