"""Training-state conversion JAX ⇄ Megatron (converters/training_state.py).

JAX trains 3 steps from the golden tiny weights and checkpoints (orbax); the checkpoint is
converted to a Megatron training checkpoint, which the Megatron trainer resumes for 2 more steps
on the same batches (data position carried over) and the same random numbers (mugv.rng's draws
for the JAX state's seed, passed through the trainer's `draws` hook because the Megatron trainer
here was built with another seed). That must land where JAX's own 5 steps land. The Megatron
checkpoint converted back to JAX must equal the step-3 JAX state bit for bit.

The reverse: the JAX step-0 state (golden weights, its null caption and EMA) converted to
Megatron, which trains 3 steps on the same batches and JAX's random numbers and checkpoints;
`megatron_to_jax` converts that, and JAX resumes for 2 steps with its own generator (the seed
travels in the checkpoint). That must land where JAX's own 5 steps land.
"""

import numpy as np
import pytest

from converters import training_state as ts
from mugv.config import get_config

CFG = get_config("tiny")
WEIGHTS = "tests/golden/dit_tiny/weights.safetensors"
OPTIM = dict(
    learning_rate=1e-3,
    warmup_steps=2,
    schedule="constant",
    decay_steps=0,
    final_lr_ratio=0.0,
    b1=0.9,
    b2=0.999,
    eps=1e-10,
    weight_decay=0.01,
    clip_norm=1.0,
    ema_decay=0.9,
    grad_accum_steps=1,
)
OBJECTIVE = dict(shift_num_frames=None, shift_ratio=1.0, i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.25)
SEED = 0
BUCKET = (3, 4, 6, 4)
# Two Adam steps on another backend from bit-identical state: float32 gradients agree to ~3e-6
# relative (tests/cross_backend/test_cross_backend_training.py) and Adam normalises them, so weights agree to a
# small fraction of lr. Measured: max |Δw| 2.4e-7, RMS 1.1e-8 (lr = 1e-3); bounds 1e-2·lr and
# 1e-4·lr leave ~40x and ~10x margin for other BLAS/XLA builds.
MAX_ABS = 1e-2 * OPTIM["learning_rate"]
RMS = 1e-4 * OPTIM["learning_rate"]


def source():
    from mugv.data.synthetic import Bucket, SyntheticTextToLatent

    return SyntheticTextToLatent([Bucket(*BUCKET)], in_channels=CFG.in_channels, text_dim=CFG.text_dim)


def batch_at(i):
    b = source().batch(i)
    b.pop("prompt_id")
    return b


def jax_draws(rng_key, step, shape):
    """The random numbers both trainers draw at `step` (mugv.rng), as Megatron Draws."""
    seed = int(rng_key[0])
    from mugv import rng
    from mugv_megatron.train import objective as mobj

    d = rng.pretrain_draws(
        seed,
        step,
        np.arange(shape[0]),
        tuple(shape[1:]),
        i2v_prob=OBJECTIVE["i2v_prob"],
        i2v_mode=OBJECTIVE["i2v_mode"],
        caption_dropout_prob=OBJECTIVE["caption_dropout_prob"],
    )
    return mobj.Draws(d["u"], d["eps"], d["n_cond"], d["drop"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import jax
    from flax import nnx

    from mugv_jax import dit
    from mugv_jax.train.checkpointing import Checkpointer

    root = tmp_path_factory.mktemp("training_state")
    trainer = ts._jax_trainer({"optim": OPTIM, "objective": OBJECTIVE}, CFG)
    params = nnx.to_pure_dict(nnx.state(dit.load(WEIGHTS, CFG), nnx.Param))
    state = trainer.init_state(SEED, params)
    rng_key = np.asarray(state["rng"])  # [seed, 0]: the seed word of mugv.rng's key
    run_config = {"model": CFG.to_dict(), "optim": OPTIM, "objective": OBJECTIVE, "seed": SEED}
    j0dir = str(root / "jax_step0")
    ck = Checkpointer(j0dir, use_async=False)
    ck.save(0, state, {"position": 0}, run_config)
    ck.close()
    for i in range(3):
        state, _ = trainer.train_step(state, trainer.put_batch(batch_at(i)))
    jdir = str(root / "jax")
    ck = Checkpointer(jdir, use_async=False)
    ck.save(3, state, {"position": 3}, {"model": CFG.to_dict(), "optim": OPTIM, "objective": OBJECTIVE, "seed": SEED})
    ck.close()
    at3 = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)
    for i in range(3, 5):
        state, _ = trainer.train_step(state, trainer.put_batch(batch_at(i)))
    at5 = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)
    return dict(root=root, jdir=jdir, j0dir=j0dir, at3=at3, at5=at5, rng_key=rng_key, trainer=trainer)


@pytest.fixture(scope="module")
def megatron_resumed(runs):
    from mugv_megatron.train import checkpointing

    mdir = str(runs["root"] / "megatron")
    ts.jax_to_megatron(runs["jdir"], mdir)
    mt = ts._megatron_trainer({"optim": OPTIM, "objective": OBJECTIVE}, CFG, seed=99)
    meta = checkpointing.restore_latest(mdir, mt)
    converted = {n: p.detach().clone() for n, p in mt.module.named_parameters()}
    position = meta["data"]["position"]
    for i in range(position, position + 2):
        b = batch_at(i)
        mt.train_step(b, draws=jax_draws(runs["rng_key"], mt.step, b["latents"].shape))
    return dict(mt=mt, mdir=mdir, meta=meta, converted=converted)


def _release_of_megatron(named):
    from mugv.layouts import megatron as layout

    return layout.megatron_state_to_release({n: t.detach().numpy() for n, t in named.items()}, CFG)


def test_conversion_carries_counters_and_weights_exactly(runs, megatron_resumed):
    meta = megatron_resumed["meta"]
    assert meta["trainer"]["step"] == 3 and meta["data"] == {"position": 3}
    assert meta["optimizer"]["count"] == 3
    want = ts.jax_tree_to_release(runs["at3"]["params"], CFG)
    got = _release_of_megatron(megatron_resumed["converted"])
    for name, value in want.items():
        assert np.array_equal(got[name], value), name


def test_jax_3_steps_then_megatron_2_equals_jax_5(runs, megatron_resumed):
    mt = megatron_resumed["mt"]
    assert mt.step == 5 and mt.optimizer.count == 5
    want = ts.jax_tree_to_release(runs["at5"]["params"], CFG)
    got = _release_of_megatron(dict(mt.module.named_parameters()))
    before = ts.jax_tree_to_release(runs["at3"]["params"], CFG)
    worst, sq, n = 0.0, 0.0, 0
    for name, value in want.items():
        d = np.abs(got[name] - value)
        worst, sq, n = max(worst, float(d.max())), sq + float((d**2).sum()), n + d.size
        # The two steps really moved the weights (the comparison is not trivially true).
        assert np.abs(value - before[name]).max() > 10 * MAX_ABS or value.size < 200, name
    rms = (sq / n) ** 0.5
    print(f"max |Δw| {worst:.2e} (bound {MAX_ABS:.0e}), rms {rms:.2e} (bound {RMS:.0e})")
    assert worst <= MAX_ABS and rms <= RMS
    ema_want = ts.jax_tree_to_release(runs["at5"]["ema"], CFG)
    ema_got = _release_of_megatron(mt.ema.shadow)
    assert max(float(np.abs(ema_got[k] - v).max()) for k, v in ema_want.items()) <= MAX_ABS


def test_megatron_back_to_jax_is_exact(runs, megatron_resumed, tmp_path):
    """Step-3 Megatron checkpoint → JAX: params, both moments, counts, EMA, null text identical."""
    from mugv_jax.train.checkpointing import Checkpointer
    from mugv_megatron.train import checkpointing

    # Only the converted step-3 checkpoint (the resumed trainer above did not save).
    assert checkpointing.steps(megatron_resumed["mdir"]) == [3]
    jdir = str(tmp_path / "jax_back")
    assert ts.megatron_to_jax(megatron_resumed["mdir"], jdir) == 3
    trainer = ts._jax_trainer({"optim": OPTIM, "objective": OBJECTIVE}, CFG)
    ck = Checkpointer(jdir, use_async=False)
    state, data, _ = ck.restore(3, trainer.abstract_state())
    ck.close()
    assert data == {"position": 3} and int(state["step"]) == 3
    import jax

    a = jax.tree.map(lambda x: np.asarray(x), state)
    b = runs["at3"]
    for key in ("params", "ema", "null_text"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
            assert np.array_equal(x, y), key
    adam_a, _ = ts._adam_states(a["opt_state"])
    adam_b, _ = ts._adam_states(b["opt_state"])
    assert int(adam_a.count) == int(adam_b.count) == 3
    for x, y in zip(jax.tree.leaves((adam_a.mu, adam_a.nu)), jax.tree.leaves((adam_b.mu, adam_b.nu))):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# The reverse: Megatron trains 3 steps, converts, JAX trains 2 more


@pytest.fixture(scope="module")
def jax_resumed(runs):
    import jax

    from mugv_jax.train.checkpointing import Checkpointer
    from mugv_megatron.train import checkpointing

    root = runs["root"]
    m0dir, mdir, jdir = str(root / "megatron_step0"), str(root / "megatron_3"), str(root / "jax_from_megatron")
    ts.jax_to_megatron(runs["j0dir"], m0dir)
    mt = ts._megatron_trainer({"optim": OPTIM, "objective": OBJECTIVE}, CFG, seed=99)
    meta = checkpointing.restore_latest(m0dir, mt)
    assert mt.step == 0 and meta["data"] == {"position": 0}
    for i in range(3):
        b = batch_at(i)
        mt.train_step(b, draws=jax_draws(runs["rng_key"], mt.step, b["latents"].shape))
    checkpointing.save(mdir, mt, {"position": 3}, meta["config"])
    assert ts.megatron_to_jax(mdir, jdir) == 3
    trainer = runs["trainer"]  # its train_step is compiled already
    ck = Checkpointer(jdir, use_async=False)
    state, data, _ = ck.restore(3, trainer.abstract_state())
    ck.close()
    at3 = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)
    for i in range(data["position"], data["position"] + 2):
        state, _ = trainer.train_step(state, trainer.put_batch(batch_at(i)))
    at5 = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)
    return dict(at3=at3, at5=at5, data=data, mt=mt)


def _max_rms(got: dict, want: dict) -> tuple[float, float]:
    worst, sq, n = 0.0, 0.0, 0
    for name, value in want.items():
        d = np.abs(got[name] - value)
        worst, sq, n = max(worst, float(d.max())), sq + float((d**2).sum()), n + d.size
    return worst, (sq / n) ** 0.5


def test_megatron_3_steps_then_jax_2_equals_jax_5(runs, jax_resumed):
    import jax

    assert jax_resumed["data"] == {"position": 3}
    at3, at5 = jax_resumed["at3"], jax_resumed["at5"]
    assert int(at3["step"]) == 3 and int(at5["step"]) == 5
    adam, _ = ts._adam_states(at5["opt_state"])
    assert int(adam.count) == 5
    # The generator is JAX's own again (the same key the JAX run used).
    assert np.array_equal(np.asarray(at3["rng"]), runs["rng_key"])
    # The conversion itself is exact: the JAX step-3 state holds the Megatron trainer's weights.
    mt = jax_resumed["mt"]
    want3 = {k: np.asarray(v) for k, v in _release_of_megatron(dict(mt.module.named_parameters())).items()}
    got3 = ts.jax_tree_to_release(at3["params"], CFG)
    for name, value in want3.items():
        assert np.array_equal(got3[name], value), name
    got = ts.jax_tree_to_release(at5["params"], CFG)
    want = ts.jax_tree_to_release(runs["at5"]["params"], CFG)
    worst, rms = _max_rms(got, want)
    print(f"reverse: max |Δw| {worst:.2e} (bound {MAX_ABS:.0e}), rms {rms:.2e} (bound {RMS:.0e})")
    assert worst <= MAX_ABS and rms <= RMS
    ema_worst, _ = _max_rms(ts.jax_tree_to_release(at5["ema"], CFG), ts.jax_tree_to_release(runs["at5"]["ema"], CFG))
    assert ema_worst <= MAX_ABS
    for x, y in zip(jax.tree.leaves(at5["null_text"]), jax.tree.leaves(runs["at5"]["null_text"])):
        assert np.array_equal(x, y)
