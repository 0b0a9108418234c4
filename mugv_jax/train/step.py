"""Train state, optimizer and the sharded train step.

The state is a plain pytree (dict) so that orbax saves and restores it onto any mesh:
  params      nested dict of float32 arrays (the model's nnx.Param values)
  opt_state   optax AdamW (+ clipping) state, sharded like params
  ema         float32 exponential moving average of params, sharded like params
  null_text   [max_text_tokens, text_dim] features that replace dropped captions (not trained)
  frozen      only with LoRA or config.freeze: the weights that do not train (no gradients, no
              optimizer state, no EMA; under LoRA in config.lora.base_dtype); `params` then holds
              only what trains (the adapters, float32)
  step        int32, rng (uint32 [seed, 0]: the key word of mugv.rng's draws), nonfinite (consecutive skipped steps),
  skipped (total)
One `jax.jit` with explicit in/out shardings and donated state does a whole step, including
gradient accumulation over micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mugv import rng as rng_ref
from mugv.config import DiTConfig
from mugv.init import InitialWeights
from mugv.layouts.jax import unflatten as _unflatten
from mugv.lora import FreezeConfig, LoraConfig
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_jax.dit import checkpoint as dit_ckpt
from mugv_jax.dit import lora as dit_lora
from mugv_jax.dit.model import RuntimeOptions, forward
from mugv_jax.parallel import sharding
from mugv_jax.train import objective as obj
from mugv_jax.train import rng

# Loss is also reported per quarter of the (shifted) timestep range.
T_QUARTILES = 4


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        if cfg.decay_steps <= 0:
            raise ValueError("optim.decay_steps must be > 0 for the cosine schedule")
        after = optax.cosine_decay_schedule(cfg.learning_rate, cfg.decay_steps, alpha=cfg.final_lr_ratio)
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
    if cfg.warmup_steps <= 0:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def param_logical_axes(config: DiTConfig) -> dict:
    """Nested dict (same structure as params) of logical-axis tuples."""
    return _unflatten(sharding.param_logical_axes(dit_ckpt.abstract_model(config)))


def batch_shapes(config: DiTConfig, latent: tuple[int, int, int], batch: int, text_len: int) -> dict:
    """{name: (shape, dtype)} of a global batch of `latent` (frames, height, width) clips."""
    f, h, w = latent
    return {
        "latents": ((batch, config.in_channels, f, h, w), np.float32),
        "y": ((batch, 1, text_len, config.text_dim), np.float32),
        "mask": ((batch, text_len), np.int32),
        "fps": ((batch,), np.float32),
    }


class Trainer:
    """Holds the static pieces of training (config, mesh, optimizer) and builds jitted steps."""

    def __init__(
        self,
        model_config: DiTConfig,
        options: RuntimeOptions,
        optim: OptimConfig,
        objective: ObjectiveConfig,
        mesh: Mesh,
        rules=sharding.DEFAULT_RULES,
        lora: LoraConfig = LoraConfig(),  # noqa: B008 -- frozen dataclasses
        freeze: FreezeConfig = FreezeConfig(),  # noqa: B008
    ):
        if lora.on and options.lora_scale != lora.scale:
            raise ValueError(f"RuntimeOptions.lora_scale={options.lora_scale} but config.lora gives {lora.scale}")
        self.model_config, self.options, self.optim, self.objective = model_config, options, optim, objective
        self.mesh, self.rules = mesh, rules
        self.lora, self.freeze = lora, freeze
        self.splits = lora.on or bool(freeze.modules)
        self.optimizer = make_optimizer(optim)
        self.schedule = learning_rate_schedule(optim)
        self._steps: dict = {}

    # --- state --------------------------------------------------------------------------------

    def split(self, tree):
        """(trainable, frozen) parts of a full params tree (or one shaped like it)."""
        return dit_lora.split(tree, self.lora, self.freeze)

    def model_params(self, state, which: str = "params"):
        """The whole model's params of a state: `which` ("params" or "ema") with the frozen part."""
        return dit_lora.merge(state[which], state["frozen"]) if self.splits else state[which]

    def _fresh_state(self, params, seed: int):
        """The state of full model params (adapters included under LoRA)."""
        c = self.model_config
        null_text = jnp.asarray(rng_ref.null_text(seed, c.max_text_tokens, c.text_dim))
        frozen = None
        if self.splits:
            params, frozen = self.split(params)
            if self.lora.on:  # the frozen base in its storage dtype (config.lora.base_dtype)
                frozen = jax.tree.map(lambda w: w.astype(self.lora.base_dtype), frozen)
        state = {
            "params": params,
            "opt_state": self.optimizer.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "null_text": null_text,
            "step": jnp.zeros((), jnp.int32),
            "rng": jnp.asarray([seed, 0], jnp.uint32),
            "nonfinite": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }
        if frozen is not None:
            state["frozen"] = frozen
        return state

    def abstract_params(self):
        """ShapeDtypeStructs of the full model params (adapters included under LoRA)."""
        params = nnx.to_pure_dict(nnx.state(dit_ckpt.abstract_model(self.model_config), nnx.Param))
        if self.lora.on:
            adapters = jax.eval_shape(lambda: dit_lora.init_params(self.model_config, self.lora))
            params = dit_lora.merge(params, adapters)
        return params

    def param_axes(self):
        """Nested logical axes of the full model params (adapters included under LoRA)."""
        axes = param_logical_axes(self.model_config)
        if self.lora.on:
            axes = dit_lora.merge(axes, dit_lora.logical_axes(self.model_config, self.lora, axes))
        return axes

    def abstract_state(self):
        """ShapeDtypeStructs of the state (with shardings): the restore target for orbax."""
        params = self.abstract_params()
        abstract = jax.eval_shape(lambda p: self._fresh_state(p, 0), params)
        shardings = self.state_shardings(abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def state_shardings(self, abstract_state):
        mesh = self.mesh
        axes, frozen_axes = self.param_axes(), None
        if self.splits:
            axes, frozen_axes = self.split(axes)
        shard = lambda tree, names: jax.tree.map(
            lambda a, n: NamedSharding(mesh, sharding.spec_for_shape(a.shape, n, mesh, self.rules)),
            tree,
            names,
            is_leaf=lambda x: isinstance(x, tuple),
        )
        p_shard = shard(abstract_state["params"], axes)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_shard = optax.tree_map_params(
            self.optimizer,
            lambda _, s: s,
            abstract_state["opt_state"],
            p_shard,
            transform_non_params=lambda _: replicated,
        )
        out = {k: jax.tree.map(lambda _: replicated, v) for k, v in abstract_state.items()}
        out.update(params=p_shard, ema=p_shard, opt_state=opt_shard)
        if frozen_axes is not None:
            out["frozen"] = shard(abstract_state["frozen"], frozen_axes)
        return out

    def init_state(self, seed: int, params=None, adapters=None):
        """A sharded fresh state; `params` (nested dict, e.g. from a release checkpoint) or the
        seed's fresh weights (`mugv.init`, the same the Megatron trainer starts from); under LoRA
        `adapters` (nested, e.g. a PEFT import) or the definition's fresh ones."""
        if params is None:
            fresh = InitialWeights(self.model_config, seed)
            params = _unflatten(dit_ckpt.params_from_release_items(fresh.items(), self.model_config))
        if self.lora.on:
            fresh = dit_lora.init_params(self.model_config, self.lora) if adapters is None else adapters
            params = dit_lora.merge(params, fresh)
        abstract = self.abstract_state()
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        whole = shardings["params"]
        if self.splits:
            whole = dit_lora.merge(whole, shardings["frozen"])
        params = jax.device_put(params, whole)
        make = jax.jit(lambda p: self._fresh_state(p, seed), out_shardings=shardings)
        return make(params)

    # --- batches ------------------------------------------------------------------------------

    def batch_sharding(self, batch: dict, processes: int = 1):
        """Shardings of a batch whose arrays hold `1/processes` of the global rows each (every
        process passes an equal slice), chosen from the global shape: a local shape could make
        `spec_for_shape` drop a mesh axis that divides the global batch but not the local one."""

        def spec(x):
            shape = (np.shape(x)[0] * processes, *np.shape(x)[1:])
            names = ("batch",) + (None,) * (np.ndim(x) - 1)
            return NamedSharding(self.mesh, sharding.spec_for_shape(shape, names, self.mesh, self.rules))

        return {k: spec(v) for k, v in batch.items()}

    def put_batch(self, batch: dict):
        """Host batch → global arrays sharded over (data, fsdp). Multi-process: each process passes
        its local part (equal row counts) and the global batch is assembled."""
        if jax.process_count() == 1:
            return jax.device_put(batch, self.batch_sharding(batch))
        shardings = self.batch_sharding(batch, jax.process_count())
        return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}

    # --- the step -----------------------------------------------------------------------------

    def loss_on_inputs(self, params, inputs, target, t):
        """Masked-frame velocity MSE for prepared inputs, plus per-t-quartile sums for metrics."""
        with sharding.activation_sharding(self.mesh, self.rules):
            out = forward(params, self.model_config, self.options, **inputs)
        pred = out[:, : self.model_config.in_channels]
        loss, per_sample = obj.masked_frame_mse(pred, target, inputs["x_mask"])
        quart = jnp.clip((t / (1000.0 / T_QUARTILES)).astype(jnp.int32), 0, T_QUARTILES - 1)
        onehot = jax.nn.one_hot(quart, T_QUARTILES)
        return loss, {"q_sum": per_sample @ onehot, "q_count": jnp.sum(onehot, axis=0)}

    def loss_and_metrics(self, params, null_text, batch, key):
        inputs, target, t = obj.prepare(key, batch, null_text, self.objective)
        return self.loss_on_inputs(params, inputs, target, t)

    def loss_and_grads(self, params, null_text, batch, key, frozen=None):
        """(loss, aux, grads) of one global batch, accumulated over optim.grad_accum_steps
        micro-batches; gradients of `params` only (the trainable part when `frozen` is given)."""
        accum = self.optim.grad_accum_steps
        b = next(iter(batch.values())).shape[0]
        if b % accum:
            raise ValueError(f"global batch {b} is not divisible by optim.grad_accum_steps={accum}")
        # All randomness is drawn for the global batch, so accumulation changes memory, not math.
        inputs, target, t = obj.prepare(key, batch, null_text, self.objective)
        loss_fn = self.loss_on_inputs
        if frozen is not None:
            loss_fn = lambda p, *a: self.loss_on_inputs(dit_lora.merge(p, frozen), *a)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (loss, aux), grads = grad_fn(params, inputs, target, t)
            return loss, aux, grads
        split = lambda x: x.reshape(accum, b // accum, *x.shape[1:])
        present = {k: v for k, v in inputs.items() if v is not None}
        micro = (jax.tree.map(split, present), split(target), split(t))

        def body(carry, mb):
            mb_inputs, mb_target, mb_t = mb
            (l, a), g = grad_fn(params, {**inputs, **mb_inputs}, mb_target, mb_t)
            return jax.tree.map(jnp.add, carry, (l, a, g)), None

        zeros = (
            jnp.zeros(()),
            {"q_sum": jnp.zeros(T_QUARTILES), "q_count": jnp.zeros(T_QUARTILES)},
            jax.tree.map(jnp.zeros_like, params),
        )
        (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
        return loss / accum, aux, jax.tree.map(lambda g: g / accum, grads)

    def apply_gradients(self, state, loss, grads):
        """Optimizer + EMA update, kept only when the loss and the gradient norm are finite
        (`jnp.where`, no host round trip); returns the new state and the step's common metrics."""
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = self.optimizer.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        d = self.optim.ema_decay
        new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], new_params)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = dict(state)
        new_state.update(
            params=keep(new_params, state["params"]),
            opt_state=keep(new_opt, state["opt_state"]),
            ema=keep(new_ema, state["ema"]),
            step=state["step"] + 1,
            nonfinite=jnp.where(finite, 0, state["nonfinite"] + 1),
            skipped=state["skipped"] + jnp.where(finite, 0, 1),
        )
        metrics = {
            "grad_norm": grad_norm,
            "learning_rate": self.schedule(state["step"]),
            "finite": finite,
            "nonfinite_in_a_row": new_state["nonfinite"],
        }
        return new_state, metrics

    def step_key(self, state):
        """mugv.rng's key of this step: (the run's seed word, step)."""
        return rng.key(state["rng"][0], state["step"])

    def _step_fn(self, state, batch):
        key = self.step_key(state)
        loss, aux, grads = self.loss_and_grads(state["params"], state["null_text"], batch, key, state.get("frozen"))
        new_state, metrics = self.apply_gradients(state, loss, grads)
        metrics.update(
            loss=loss,
            loss_by_t_quartile=aux["q_sum"] / jnp.maximum(aux["q_count"], 1),
            loss_by_t_count=aux["q_count"],  # 0: no sample in that quartile this step
        )
        return new_state, metrics

    def abstract_step(self, batch_shapes: dict):
        """(the jitted step, its abstract state, its abstract batch) for a batch given as
        {name: (shape, dtype)}, with the shardings `train_step` uses: what the planner compiles
        and mugv_jax/export.py lowers for a pod, nothing allocated."""
        arrays = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch_shapes.items()}
        batch_sh = self.batch_sharding(arrays)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in arrays.items()}
        state = self.abstract_state()
        state_sh = jax.tree.map(lambda a: a.sharding, state)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        step = jax.jit(
            self._step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=(0,)
        )
        return step, state, batch

    def train_step(self, state, batch):
        """The compiled step for this batch's shapes (cached per bucket)."""
        key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in self._steps:
            state_sh = jax.tree.map(lambda x: x.sharding, state)
            batch_sh = self.batch_sharding(batch)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self._steps[key] = jax.jit(
                self._step_fn,
                in_shardings=(state_sh, batch_sh),
                out_shardings=(state_sh, replicated),
                donate_argnums=(0,),
            )
        return self._steps[key](state, batch)
