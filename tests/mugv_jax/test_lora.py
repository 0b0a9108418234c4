"""LoRA in the JAX DiT (mugv/lora.py's definition): B = 0 changes nothing, bit for bit; an adapter
computes W + scale·B·A exactly as a merged weight would (float32); adapters move between release
and JAX layouts exactly; the trainer trains the adapters only: the base stays bit-identical and has
no optimizer state or EMA, and sharding follows the one rule table."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from mugv.io import peft as peft_io
from mugv.layouts import jax as jax_layout
from mugv.lora import FreezeConfig, LoraConfig, init_adapters
from mugv.training import OptimConfig
from mugv_jax.dit import checkpoint as dit_ckpt
from mugv_jax.dit import lora as dit_lora
from mugv_jax.dit.model import RuntimeOptions, forward
from mugv_jax.train import step as tr
from tests.trainer_helpers import TINY, host_batch, make_mesh, make_source, to_numpy

GOLDEN = Path(__file__).parent.parent / "golden" / "dit_tiny" / "weights.safetensors"
LORA = LoraConfig(rank=3, alpha=6.0, init_seed=11)
# A merged weight W + s·B·A sums in another order than W·x + s·B·(A·x): float32 rounding only.
MERGED_RTOL = 1e-5
# A bfloat16 base against a float32 one holding the same values: the same float32 arithmetic,
# up to XLA fusing the casts differently.
BF16_BASE_RTOL = 1e-6


def _inputs():
    rng = np.random.default_rng(0)
    b, t, h, w = 2, 3, 4, 6  # non-square, multi-frame
    return dict(
        x=rng.standard_normal((b, TINY.in_channels, t, h, w)).astype(np.float32),
        timestep=np.array([300.0, 700.0], np.float32),
        y=rng.standard_normal((b, 1, 5, TINY.text_dim)).astype(np.float32),
        mask=np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
        x_mask=np.array([[False, True, True], [True, True, True]]),
        fps=np.array([24.0], np.float32),
    )


@pytest.fixture(scope="module")
def base():
    return jax_layout.unflatten(dit_ckpt.params_from_release_items(load_file(GOLDEN).items(), TINY))


def make_trainer(shape=(1, 1, 1, 1), lora=LoraConfig(), freeze=FreezeConfig()):  # noqa: B008 -- frozen
    opts = RuntimeOptions(lora_scale=lora.scale if lora.on else 0.0)
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, ema_decay=0.5)
    return tr.Trainer(TINY, opts, optim, tr.ObjectiveConfig(), make_mesh(shape), lora=lora, freeze=freeze)


def _forward(params, lora=LORA):
    opts = RuntimeOptions(lora_scale=lora.scale)
    return np.asarray(jax.jit(lambda p, i: forward(p, TINY, opts, **i))(params, _inputs()))


def test_adapters_move_between_release_and_jax_layouts_exactly():
    init = init_adapters(TINY, LORA)
    nested = dit_lora.init_params(TINY, LORA)
    flat = jax_layout.flatten(nested)
    assert flat["blocks.attn.qkv.lora_a"].shape == (TINY.depth, TINY.hidden_size, 3)
    assert flat["blocks.attn.qkv.lora_b"].shape == (TINY.depth, 3, 3, TINY.num_heads, TINY.head_dim)
    assert flat["blocks.cross_attn.proj.lora_a"].shape == (TINY.depth, TINY.num_heads, TINY.head_dim, 3)
    back = dit_lora.to_release(nested)
    assert back.keys() == init.keys()
    assert all(np.array_equal(back[k], init[k]) for k in init)


def test_b_zero_equals_the_base_model_exactly_and_an_adapter_equals_its_merged_weight(base):
    adapters = dit_lora.init_params(TINY, LORA)
    ref = _forward(base)
    with_lora = dit_lora.merge(base, adapters)
    assert np.array_equal(_forward(with_lora), ref)  # B = 0: bit for bit
    # A nonzero B: the same as folding s·B·A into the base kernel (in release layout).
    rng = np.random.default_rng(3)
    flat = jax_layout.flatten(adapters)
    flat = {
        k: (rng.standard_normal(v.shape).astype(np.float32) * 0.5 if k.endswith("lora_b") else v)
        for k, v in flat.items()
    }
    trained = dit_lora.merge(base, jax_layout.unflatten(flat))
    out = _forward(trained)
    assert np.abs(out - ref).max() > 1e-3  # the adapter does something
    merged = jax_layout.flatten(base)
    for site in LORA.sites():
        a_path, b_path = (jax_layout.adapter_jax_path(site.release, w) for w in "AB")
        kpath = a_path.rsplit(".", 1)[0] + ".kernel"
        layers = []
        for i in range(TINY.depth):
            _, a = jax_layout.adapter_to_release(a_path, flat[a_path][i], i)
            _, b = jax_layout.adapter_to_release(b_path, flat[b_path][i], i)
            name, w = jax_layout.jax_to_release(kpath, merged[kpath][i], TINY, layer=i)
            layers.append(jax_layout.release_to_jax(name, w + LORA.scale * (b @ a), TINY)[2])
        merged[kpath] = np.stack(layers)
    np.testing.assert_allclose(out, _forward(jax_layout.unflatten(merged)), rtol=MERGED_RTOL, atol=MERGED_RTOL)


def test_adapters_without_a_scale_are_refused(base):
    with_lora = dit_lora.merge(base, dit_lora.init_params(TINY, LORA))
    with pytest.raises(ValueError, match="lora_scale"):
        jax.eval_shape(lambda p: forward(p, TINY, RuntimeOptions(), **_inputs()), with_lora)
    with pytest.raises(ValueError, match="lora_scale"):
        tr.Trainer(TINY, RuntimeOptions(), OptimConfig(), tr.ObjectiveConfig(), make_mesh((1, 1, 1, 1)), lora=LORA)


def test_adapters_are_sharded_by_the_one_rule_table_like_their_base():
    sh = make_trainer(shape=(1, 2, 2, 1), lora=LORA).abstract_state()["params"]["blocks"]["mlp"]
    spec = lambda p, w: p[w].sharding.spec
    # A over its base's input axis, B over its output axis (embed → fsdp, mlp → tensor).
    assert spec(sh["fc1"], "lora_a")[1] == "fsdp" and spec(sh["fc1"], "lora_b")[2] == "tensor"
    assert spec(sh["fc2"], "lora_a")[1] == "tensor" and spec(sh["fc2"], "lora_b")[2] == "fsdp"


def test_the_trainer_trains_the_adapters_only(base, tmp_path):
    t = make_trainer(lora=LORA)
    state = t.init_state(0, params=base)
    # Only the adapters train: the base sits apart with no optimizer state and no EMA.
    trainable = jax_layout.flatten(state["params"])
    assert set(trainable) == set(jax_layout.flatten(dit_lora.init_params(TINY, LORA)))
    assert jax_layout.flatten(state["frozen"]).keys() == jax_layout.flatten(base).keys()
    n_adapter = sum(v.size for v in trainable.values())
    # Adam's μ and ν of the adapters, and step counters.
    assert 2 * n_adapter <= sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * n_adapter + 4
    assert {x.dtype for x in jax.tree.leaves(state["frozen"])} == {np.dtype(np.float32)}  # base_dtype's default
    frozen0, a0 = to_numpy(state["frozen"]), to_numpy(state["params"])
    new, metrics = t.train_step(state, t.put_batch(host_batch(make_source())))
    assert bool(metrics["finite"])
    frozen1, a1 = to_numpy(new["frozen"]), to_numpy(new["params"])
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen1)))
    f0, f1 = jax_layout.flatten(a0), jax_layout.flatten(a1)
    # With B = 0, A has no gradient on the first step; B moves.
    assert all(np.array_equal(f0[k], f1[k]) for k in f0 if k.endswith("lora_a"))
    assert all(np.abs(f0[k] - f1[k]).min() > 0 for k in f0 if k.endswith("lora_b"))
    ema = jax_layout.flatten(to_numpy(new["ema"]))
    assert all(np.allclose(ema[k], 0.5 * f0[k] + 0.5 * f1[k], rtol=1e-6, atol=1e-8) for k in f0)
    whole = t.model_params(new)
    assert whole["blocks"]["attn"]["qkv"].keys() == {"kernel", "bias", "lora_a", "lora_b"}
    # The trained adapters through PEFT's format and back: bit for bit.
    out = peft_io.write(str(tmp_path / "peft"), dit_lora.to_release(a1), LORA, TINY)
    lora, back = peft_io.read(out, TINY)
    assert lora == LORA
    g = jax_layout.flatten(dit_lora.from_release(back, TINY))
    assert g.keys() == f1.keys() and all(np.array_equal(g[k], f1[k]) for k in f1)


def test_a_bfloat16_base_is_stored_in_bfloat16_and_trains_float32_adapters(base):
    t = make_trainer(lora=dataclasses.replace(LORA, base_dtype="bfloat16"))
    state = t.init_state(0, params=base)
    dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}
    assert dtypes(state["frozen"]) == dtypes(t.abstract_state()["frozen"]) == {jnp.dtype(jnp.bfloat16)}
    assert dtypes(state["params"]) == {jnp.dtype(jnp.float32)}
    batch = t.put_batch(host_batch(make_source()))
    key = t.step_key(state)
    grads = jax.eval_shape(t.loss_and_grads, state["params"], state["null_text"], batch, key, state["frozen"])[2]
    assert dtypes(grads) == {jnp.dtype(jnp.float32)}
    # The loss is that of a float32 base holding the same rounded values: the forward casts every
    # weight to the compute dtype (float32 here), so the rounding is the only difference.
    widened = dit_lora.merge(state["params"], jax.tree.map(lambda w: w.astype(jnp.float32), state["frozen"]))
    ref_loss = float(jax.jit(t.loss_and_metrics)(widened, state["null_text"], batch, key)[0])
    frozen0, a0 = to_numpy(state["frozen"]), jax_layout.flatten(to_numpy(state["params"]))
    new, metrics = t.train_step(state, batch)
    assert bool(metrics["finite"])
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=BF16_BASE_RTOL)
    # The step keeps the base in bfloat16, unchanged, and moves the float32 adapters (B first).
    assert dtypes(new["frozen"]) == {jnp.dtype(jnp.bfloat16)}
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(frozen0), jax.tree.leaves(to_numpy(new["frozen"]))))
    assert dtypes(new["params"]) == dtypes(new["ema"]) == {jnp.dtype(jnp.float32)}
    a1 = jax_layout.flatten(to_numpy(new["params"]))
    assert all(np.abs(a0[k] - a1[k]).min() > 0 for k in a0 if k.endswith("lora_b"))


def test_freeze_keeps_a_module_apart_without_optimizer_state_or_ema():
    # The step's split is the LoRA one above (gradients of `params` only); here: what is split.
    t = make_trainer(freeze=FreezeConfig(modules=("y_embedder",)))
    state = t.abstract_state()
    assert state["frozen"].keys() == {"y_embedder"} and "y_embedder" not in state["params"]
    assert state["ema"].keys() == state["params"].keys() == set(t.abstract_params()) - {"y_embedder"}
    n_trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert 2 * n_trainable <= sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * n_trainable + 4


def test_preference_mode_with_lora_or_frozen_modules_is_refused_naming_the_flags():
    from mugv.run.config import ConfigError, as_run_config
    from mugv_jax.train.backend import build_trainer

    for tuned in ({"lora": {"rank": 4}}, {"freeze": {"modules": ["y_embedder"]}}):
        with pytest.raises(ConfigError, match="--config.mode='preference' with --config.lora.rank"):
            build_trainer(as_run_config({"mode": "preference", **tuned}), "preference")


def test_a_frozen_module_run_exports_whole_and_a_lora_run_points_to_merge(tmp_path):
    from mugv.io.weights import open_weights
    from mugv_jax.train import checkpointing

    release = load_file(str(GOLDEN))
    params = jax_layout.unflatten(dit_ckpt.params_from_release_items(release.items(), TINY))
    for name, trainer in [
        ("freeze", make_trainer(freeze=FreezeConfig(modules=("y_embedder",)))),
        ("lora", make_trainer(lora=LORA)),
    ]:
        ckpt = checkpointing.Checkpointer(str(tmp_path / name / "checkpoints"), use_async=False)
        ckpt.save(0, trainer.init_state(0, params), {}, {"model": TINY.to_dict()})
        ckpt.close()
    for weights in ("raw", "ema"):  # the frozen module completes both
        got = open_weights(f"jax:{tmp_path / 'freeze'}", model=TINY, weights=weights)
        assert got.keys() == release.keys() and all(np.array_equal(got[k], release[k]) for k in release)
    with pytest.raises(ValueError, match="is a LoRA run.*python -m converters merge"):
        open_weights(f"jax:{tmp_path / 'lora'}", model=TINY)
