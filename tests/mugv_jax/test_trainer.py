"""The sharded train step: parallel layouts equal one device; accumulation, EMA, schedules, NaNs."""

import jax
import numpy as np
import pytest

from mugv.training import OptimConfig
from mugv_jax.train import step as tr
from tests.trainer_helpers import guard_train_steps, host_batch, make_source, make_trainer, to_numpy

# float32: a parallel layout only reorders reductions.
PARALLEL_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _no_implicit_transfers_in_steps(monkeypatch):
    guard_train_steps(monkeypatch)


def _loss_and_grads(trainer, state, batch):
    fn = jax.jit(jax.value_and_grad(trainer.loss_and_metrics, has_aux=True))
    (loss, _), grads = fn(state["params"], state["null_text"], batch, jax.random.PRNGKey(7))
    return float(loss), to_numpy(grads)


@pytest.fixture(scope="module")
def reference():
    t = make_trainer()
    state = t.init_state(0)
    batch = host_batch(make_source())
    return _loss_and_grads(t, state, t.put_batch(batch)), batch


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1)])
def test_parallel_layout_gives_single_device_loss_and_gradients(reference, shape):
    (ref_loss, ref_grads), batch = reference
    t = make_trainer(shape)
    state = t.init_state(0)
    # Parameters really are sharded over fsdp/tensor where the mesh has them.
    spec = state["params"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec
    assert spec[1] == ("fsdp" if shape[1] > 1 else None) and spec[2] == ("tensor" if shape[2] > 1 else None)
    loss, grads = _loss_and_grads(t, state, t.put_batch(batch))
    assert loss == pytest.approx(ref_loss, rel=PARALLEL_RTOL)
    flat_ref = jax.tree.leaves(ref_grads)
    flat = jax.tree.leaves(grads)
    for g, r in zip(flat, flat_ref):
        scale = max(float(np.abs(r).max()), 1e-12)
        assert float(np.abs(g - r).max()) / scale <= PARALLEL_RTOL


def test_gradient_accumulation_equals_the_full_batch():
    batch = host_batch(make_source())
    results = []
    for accum in (1, 4):
        t = make_trainer(optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, grad_accum_steps=accum))
        state = t.init_state(0)
        fn = jax.jit(t.loss_and_grads)
        loss, aux, grads = fn(state["params"], state["null_text"], t.put_batch(batch), jax.random.PRNGKey(3))
        results.append((float(loss), to_numpy(aux), to_numpy(grads)))
        _, metrics = t.train_step(state, t.put_batch(batch))  # the step itself runs accumulated
        assert bool(metrics["finite"])
    (l1, a1, g1), (l4, a4, g4) = results
    assert l4 == pytest.approx(l1, rel=PARALLEL_RTOL)
    np.testing.assert_allclose(a4["q_count"], a1["q_count"])
    for g, r in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        assert float(np.abs(g - r).max()) / max(float(np.abs(r).max()), 1e-12) <= PARALLEL_RTOL


def test_one_step_updates_params_ema_and_counters():
    t = make_trainer(optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, ema_decay=0.9))
    state = t.init_state(0)
    p0 = to_numpy(state["params"])
    new, metrics = t.train_step(state, t.put_batch(host_batch(make_source())))
    p1, ema = to_numpy(new["params"]), to_numpy(new["ema"])
    assert int(new["step"]) == 1 and bool(metrics["finite"]) and int(new["skipped"]) == 0
    changed = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1))]
    assert min(changed) > 0  # AdamW moves every parameter
    for e, a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(e, 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-8)


def test_learning_rate_schedules():
    const = tr.learning_rate_schedule(OptimConfig(learning_rate=1e-4, warmup_steps=10))
    assert float(const(0)) == 0.0 and float(const(5)) == pytest.approx(5e-5)
    assert float(const(10)) == pytest.approx(1e-4) and float(const(10_000)) == pytest.approx(1e-4)
    cos = tr.learning_rate_schedule(
        OptimConfig(learning_rate=1e-4, warmup_steps=10, schedule="cosine", decay_steps=100, final_lr_ratio=0.1)
    )
    assert float(cos(60)) == pytest.approx(1e-5 + 0.5 * 9e-5, rel=1e-5)
    assert float(cos(110)) == pytest.approx(1e-5, rel=1e-5)
    with pytest.raises(ValueError, match="decay_steps"):
        tr.learning_rate_schedule(OptimConfig(schedule="cosine"))


def test_non_finite_batch_skips_the_update_and_counts():
    t = make_trainer()
    state = t.init_state(0)
    good = host_batch(make_source())
    bad = dict(good, latents=np.full_like(good["latents"], np.nan))
    before = to_numpy(state["params"])
    state, m = t.train_step(state, t.put_batch(bad))
    assert not bool(m["finite"]) and int(state["nonfinite"]) == 1 and int(state["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(to_numpy(state["params"]))):
        np.testing.assert_array_equal(a, b)
    state, m = t.train_step(state, t.put_batch(bad))
    assert int(state["nonfinite"]) == 2
    state, m = t.train_step(state, t.put_batch(good))
    assert bool(m["finite"]) and int(state["nonfinite"]) == 0 and int(state["skipped"]) == 2
    assert int(state["step"]) == 3


def test_sharding_rules_are_a_config_field_defaulting_to_the_table():
    from mugv.run.config import as_run_config
    from mugv_jax.parallel import sharding
    from mugv_jax.train.backend import build_trainer

    mesh = {"ici": {"data": 4, "fsdp": 2, "tensor": 1, "context": 1}}
    fc1 = lambda run: build_trainer(run).abstract_state()["params"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec

    assert sharding.rules_with(()) == sharding.DEFAULT_RULES
    assert fc1(as_run_config({"mesh": mesh}))[1] == "fsdp"  # the table: embed → fsdp
    run = as_run_config({"mesh": mesh, "sharding_rules": [["embed", None], ["mlp", ["fsdp"]]]})
    spec = fc1(run)
    assert spec[1] is None and spec[2] == "fsdp"  # [layers, embed, mlp]
    with pytest.raises(ValueError, match=r"--config.sharding_rules entry \('embd', None\): no logical axis 'embd'"):
        build_trainer(as_run_config({"sharding_rules": [["embd", None]]}))
    with pytest.raises(ValueError, match=r"\['model'\] are not mesh axes"):
        build_trainer(as_run_config({"sharding_rules": [["mlp", "model"]]}))


def test_an_implicit_transfer_inside_a_guarded_step_fails():
    # The batch as host numpy arrays instead of put_batch's device arrays: the jitted step would
    # copy it to the devices on the quiet, and the guard refuses.
    t = make_trainer()
    state = t.init_state(0)
    batch = host_batch(make_source())
    with pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed host-to-device transfer"):
        t.train_step(state, batch)
