"""The Megatron and JAX trainers compute the same training step (float32).

Both load the same release-layout weights (tests/golden/dit_tiny) and get the same batch
(3 latent frames of 4x6, B=4: non-square, multi-frame) and the same random numbers, drawn once
in numpy: logit-normal u, noise, conditioning-frame counts (i2v, "quarter") and caption drops,
with the same null caption. The Megatron side runs `mugv_megatron.train.objective.prepare` and its
trainer; the JAX side builds its inputs with `mugv_jax.train.objective`'s functions from the same
numbers and calls `mugv_jax.train.step.Trainer.loss_on_inputs` under `jax.value_and_grad`, then
one step of `Trainer.optimizer` (optax clip + AdamW). Gradients are compared per release tensor
(Megatron names → release via mugv/layouts/megatron.py, JAX paths → release via
mugv/layouts/jax.py). TP=2 (and TP=2 + sequence parallel) on two spawned gloo processes
run the Megatron trainer's own step and must give the TP=1 loss, gradients and new weights; so
must data parallelism over the same two processes (DP=2).
"""

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mugv.config import get_config
from mugv.io.torch_cpu import free_port
from mugv.layouts import jax as jax_layout
from mugv.layouts import megatron as layout
from mugv.training import ObjectiveConfig, OptimConfig, shift_ratio
from mugv_megatron.parallel import state as parallel
from mugv_megatron.train import checkpointing
from mugv_megatron.train import objective as mobj

WEIGHTS = Path(__file__).parent.parent / "golden" / "dit_tiny" / "weights.safetensors"
CFG = get_config("tiny")
# Tolerances of issue 4: loss relative 1e-5; gradients 1e-4 relative to each tensor's largest
# entry (measured: see the report in docs/megatron_training.md).
LOSS_REL = 1e-5
GRAD_REL = 1e-4
# TP only reorders float32 sums: same bound as tests/mugv_megatron/test_megatron_tp.py.
TP_GRAD_REL = 1e-5
LR, WD = 1e-3, 0.01
OPTIM = OptimConfig(learning_rate=LR, warmup_steps=0, weight_decay=WD, clip_norm=1.0, ema_decay=0.9)
OBJECTIVE = ObjectiveConfig(i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.5)
LATENT = (4, 24, 3, 4, 6)
TP = 2


def make_case():
    from mugv.data.synthetic import Bucket, SyntheticTextToLatent

    src = SyntheticTextToLatent(
        [Bucket(3, 4, 6, LATENT[0])], in_channels=CFG.in_channels, text_dim=CFG.text_dim, text_len=8
    )
    batch = src.batch(0)
    batch.pop("prompt_id")
    # Seed chosen so that the draws contain a conditioning frame and a dropped caption
    # (asserted below), so both code paths are exercised.
    draws = mobj.draw(np.random.default_rng(5), LATENT, OBJECTIVE)
    null = (
        np.random.default_rng(9).standard_normal((CFG.max_text_tokens, CFG.text_dim)) / np.sqrt(CFG.text_dim)
    ).astype(np.float32)
    return batch, draws, null


def release_weights():
    from safetensors.numpy import load_file

    return load_file(WEIGHTS)


def _megatron_run(batch, draws, null):
    """(loss, release-named grads, release-named params after one step) from the trainer."""
    from mugv_megatron.train.step import Trainer

    state = {k: torch.from_numpy(v) for k, v in release_weights().items()}
    tr = Trainer(CFG, OPTIM, OBJECTIVE, seed=0, release_state=state, use_megatron_optimizer=False)
    tr.null_text = torch.from_numpy(null)
    rows = tr.local_rows(LATENT[0])
    local = {k: v[rows] for k, v in batch.items()}
    loss, _, _ = tr.loss_and_grads(local, draws.slice(rows.start, rows.stop))
    grads = {n: p.grad.detach().clone() for n, p in tr.module.named_parameters()}
    metrics = tr.train_step(batch, draws=draws)
    params = {n: p.detach().clone() for n, p in tr.module.named_parameters()}
    return float(loss), metrics, grads, params


def _to_release(named: dict) -> dict:
    return {
        k: np.asarray(v)
        for k, v in layout.megatron_state_to_release({n: t.numpy() for n, t in named.items()}, CFG).items()
    }


def _jax_flat_to_release(tree) -> dict:
    import jax

    flat = {k: np.asarray(jax.device_get(v)) for k, v in jax_layout.flatten(tree).items()}
    return dict(jax_layout.jax_to_release_all(flat, CFG))


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.fixture(scope="module")
def megatron_tp1(case):
    parallel.setup(1)
    loss, metrics, grads, params = _megatron_run(*case)
    return loss, metrics, grads, params


@pytest.fixture(scope="module")
def jax_run(case):
    return _jax_step(*case)


def _jax_step(batch, draws, null):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mugv_jax import dit
    from mugv_jax.dit.model import RuntimeOptions
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.train import objective as jobj
    from mugv_jax.train import step as jtr

    model = dit.load(str(WEIGHTS), CFG)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mesh = mesh_lib.build_mesh(dict(data=1, fsdp=1, tensor=1, context=1), devices=jax.devices()[:1])
    optim_cfg = OptimConfig(**{f: getattr(OPTIM, f) for f in OPTIM.__dataclass_fields__})
    obj_cfg = ObjectiveConfig(**{f: getattr(OBJECTIVE, f) for f in OBJECTIVE.__dataclass_fields__})
    trainer = jtr.Trainer(CFG, RuntimeOptions(), optim_cfg, obj_cfg, mesh)
    # The JAX objective's own functions on the shared random numbers.
    x0 = jnp.asarray(batch["latents"])
    frames, h, w = x0.shape[2:]
    t = jobj.shift_t(
        jax.nn.sigmoid(jnp.asarray(draws.u)) * 1000.0, shift_ratio((frames, h, w), obj_cfg.shift_num_frames)
    )
    eps = jnp.asarray(draws.eps)
    x_mask = jnp.arange(frames)[None, :] >= jnp.asarray(draws.n_cond)[:, None]
    xt = jnp.where(x_mask[:, None, :, None, None], jobj.noisy_latents(x0, eps, t), x0)
    drop = jnp.asarray(draws.drop)
    length = batch["y"].shape[2]
    y = jnp.where(drop[:, None, None, None], jnp.asarray(null)[:length][None, None], batch["y"])
    mask = jnp.where(drop[:, None], 1, jnp.asarray(batch["mask"]))
    inputs = dict(x=xt, timestep=t, y=y, mask=mask, x_mask=x_mask, fps=jnp.asarray(batch["fps"]), frame_indice=None)

    # One compiled function: op-by-op dispatch of the scanned model and of optax costs more
    # than a single XLA compile on a small CPU.
    def step(params, inputs, target, t):
        (loss, _), grads = jax.value_and_grad(trainer.loss_on_inputs, has_aux=True)(params, inputs, target, t)
        updates, _ = trainer.optimizer.update(grads, trainer.optimizer.init(params), params)
        return loss, grads, optax.apply_updates(params, updates)

    loss, grads, new_params = jax.jit(step)(params, inputs, x0 - eps, t)
    return float(loss), _jax_flat_to_release(grads), _jax_flat_to_release(new_params)


def test_draws_exercise_conditioning_and_dropout(case):
    _, draws, _ = case
    assert draws.n_cond.max() >= 1 and draws.n_cond.min() == 0
    assert draws.drop.any() and not draws.drop.all()


def test_loss_matches_jax(megatron_tp1, jax_run):
    m_loss, metrics = megatron_tp1[0], megatron_tp1[1]
    j_loss = jax_run[0]
    print(f"loss megatron {m_loss:.8f} jax {j_loss:.8f} rel {abs(m_loss - j_loss) / abs(j_loss):.2e}")
    assert abs(m_loss - j_loss) <= LOSS_REL * abs(j_loss), (m_loss, j_loss)
    # The trainer step reports the same loss it trained on.
    assert metrics["loss"] == pytest.approx(m_loss, rel=1e-7) and metrics["finite"]


def test_gradients_match_jax(megatron_tp1, jax_run):
    m = _to_release(megatron_tp1[2])
    j = jax_run[1]
    assert set(m) == set(j)
    worst = 0.0
    for name, want in j.items():
        scale = float(np.abs(want).max())
        err = float(np.abs(m[name] - want).max())
        assert err <= GRAD_REL * max(scale, 1e-12), (name, err, scale)
        worst = max(worst, err / max(scale, 1e-12))
    print(f"worst relative gradient error {worst:.2e}")


def test_parameters_after_one_adamw_step_match_jax(megatron_tp1, jax_run):
    """After one step AdamW moves every weight by lr·(g/(|g|+eps) + wd·w): where |g| is well above
    the gradients' agreement bound the two updates must agree to 1e-3·lr; elsewhere the sign of
    a near-zero gradient may differ, which bounds the difference by 2·lr. "Well above" = 10x the
    gradient bound relative to the tensor's largest gradient."""
    before = release_weights()
    m = _to_release(megatron_tp1[3])
    j = jax_run[2]
    grads, m_grads = jax_run[1], _to_release(megatron_tp1[2])
    covered = total = 0
    for name, want in j.items():
        g = grads[name]
        # Exactly-zero gradients on both sides (the 24 unused output channels) leave only the
        # decay term, which must agree as well.
        zero = (g == 0) & (m_grads[name] == 0)
        sure = (np.abs(g) > 10 * GRAD_REL * np.abs(g).max()) | zero
        d_m, d_j = m[name] - before[name], want - before[name]
        assert np.abs(d_m - d_j)[sure].max(initial=0.0) <= 1e-3 * LR, name
        assert np.abs(d_m - d_j).max() <= 2 * LR * (1 + 1e-3), name
        covered, total = covered + int(sure.sum()), total + sure.size
    # The strict check covers most weights, so it is not vacuous.
    print(f"strictly checked weights: {covered / total:.1%}")
    assert covered / total > 0.5


# ---------------------------------------------------------------------------------------------
# TP = 2 through the trainer step


def _tp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    parallel.setup(TP, rank=rank, world_size=TP, master_port=port, timeout=datetime.timedelta(seconds=120))
    batch, draws, null = make_case()
    from megatron.core import parallel_state as ps

    from mugv_megatron.train.step import Trainer

    results = {}
    for variant, sp in (("tp", False), ("tp_sp", True)):
        state = {k: torch.from_numpy(v) for k, v in release_weights().items()}
        tr = Trainer(
            CFG, OPTIM, OBJECTIVE, seed=0, release_state=state, sequence_parallel=sp, use_megatron_optimizer=False
        )
        tr.null_text = torch.from_numpy(null)
        loss, _, _ = tr.loss_and_grads(batch, draws)
        for n, p in tr.module.named_parameters():
            results[f"{variant}.grad.{n}"] = p.grad.detach().clone()
        metrics = tr.train_step(batch, draws=draws)
        results[f"{variant}.loss"] = torch.tensor(float(loss))
        results[f"{variant}.step_loss"] = torch.tensor(metrics["loss"])
        results[f"{variant}.grad_norm"] = torch.tensor(metrics["grad_norm"])
        for n, p in tr.module.named_parameters():
            results[f"{variant}.param.{n}"] = p.detach().clone()
            results[f"{variant}.exp_avg.{n}"] = tr.optimizer.moments(p)["exp_avg"].clone()
            results[f"{variant}.ema.{n}"] = tr.ema.shadow[n].clone()
        if sp:
            # A TP=2 checkpoint, restored at TP=1 by the test.
            checkpointing.save(str(Path(out_dir) / "ckpt"), tr, {"position": 1})
    assert ps.get_tensor_model_parallel_world_size() == TP
    # The same two processes as data parallel (TP=1, DP=2): each takes half of the global batch
    # and of the global draws; the all-reduced gradients are the full batch's.
    ps.destroy_model_parallel()
    parallel.setup(1, rank=rank, world_size=TP, master_port=port)
    assert ps.get_data_parallel_world_size() == 2
    state = {k: torch.from_numpy(v) for k, v in release_weights().items()}
    tr = Trainer(CFG, OPTIM, OBJECTIVE, seed=0, release_state=state, use_megatron_optimizer=False)
    tr.null_text = torch.from_numpy(null)
    rows = tr.local_rows(LATENT[0])
    local = {k: v[rows] for k, v in batch.items()}
    loss, _, _ = tr.loss_and_grads(local, draws.slice(rows.start, rows.stop))
    for n, p in tr.module.named_parameters():
        results[f"dp.grad.{n}"] = p.grad.detach().clone()
    metrics = tr.train_step(batch, draws=draws)
    results["dp.loss"] = torch.tensor(float(loss))  # this rank's half only
    results["dp.step_loss"] = torch.tensor(metrics["loss"])
    results["dp.grad_norm"] = torch.tensor(metrics["grad_norm"])
    for n, p in tr.module.named_parameters():
        results[f"dp.param.{n}"] = p.detach().clone()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    parallel.teardown()


@pytest.fixture(scope="module")
def tp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cross_tp")
    mp.spawn(_tp_worker, args=(free_port(), str(out)), nprocs=TP, join=True)
    return out


@pytest.fixture(scope="module")
def tp_ranks(tp_dir):
    return [torch.load(tp_dir / f"rank{r}.pt", weights_only=True) for r in range(TP)]


def _merge(ranks, prefix, name):
    return layout.tp_merge(name, [r[prefix + name] for r in ranks], lambda a, d: torch.cat(a, d))


@pytest.mark.parametrize("variant", ["tp", "tp_sp"])
def test_tp2_trainer_step_matches_tp1(tp_ranks, megatron_tp1, variant):
    loss1, metrics1, grads1, params1 = megatron_tp1
    for r in tp_ranks:
        assert abs(r[f"{variant}.loss"].item() - loss1) <= LOSS_REL * abs(loss1)
        assert abs(r[f"{variant}.step_loss"].item() - loss1) <= LOSS_REL * abs(loss1)
        assert abs(r[f"{variant}.grad_norm"].item() - metrics1["grad_norm"]) <= 1e-5 * metrics1["grad_norm"]
    worst = 0.0
    for name, want in grads1.items():
        got = _merge(tp_ranks, f"{variant}.grad.", name)
        scale = max(want.abs().max().item(), 1e-12)
        assert (got - want).abs().max().item() <= TP_GRAD_REL * scale, name
        worst = max(worst, (got - want).abs().max().item() / scale)
    print(
        f"{variant}: loss rel {abs(tp_ranks[0][f'{variant}.loss'].item() - loss1) / loss1:.2e}, "
        f"worst relative gradient error {worst:.2e}"
    )
    for name, want in params1.items():
        got = _merge(tp_ranks, f"{variant}.param.", name)
        # One AdamW step from identical weights; see the JAX comparison for the 2·lr bound.
        assert (got - want).abs().max().item() <= 2 * LR * (1 + 1e-3), name


def test_tp2_checkpoint_restores_at_tp1(tp_ranks, tp_dir, megatron_tp1):
    """The TP=2 (+SP) trainer's torch_dist checkpoint, loaded by a one-process trainer, gives back
    exactly the merged TP=2 weights, Adam moments and EMA (dist_checkpointing reassembles the
    shards)."""
    from mugv_megatron.train.step import Trainer

    ckdir = tp_dir / "ckpt"
    tr = Trainer(CFG, OPTIM, OBJECTIVE, seed=7, use_megatron_optimizer=False)
    meta = checkpointing.restore_latest(str(ckdir), tr)
    assert meta["data"] == {"position": 1} and tr.step == 1 and tr.optimizer.count == 1
    for n, p in tr.module.named_parameters():
        assert torch.equal(p.detach(), _merge(tp_ranks, "tp_sp.param.", n)), n
        assert torch.equal(tr.optimizer.moments(p)["exp_avg"], _merge(tp_ranks, "tp_sp.exp_avg.", n)), n
        assert torch.equal(tr.ema.shadow[n], _merge(tp_ranks, "tp_sp.ema.", n)), n


def test_dp2_trainer_step_matches_tp1(tp_ranks, megatron_tp1):
    """Data parallel over the same two processes: global loss, gradients and the new weights of
    the one-process step (only the order of float32 sums differs)."""
    loss1, metrics1, grads1, params1 = megatron_tp1
    for r in tp_ranks:
        assert abs(r["dp.step_loss"].item() - loss1) <= LOSS_REL * abs(loss1)
        assert abs(r["dp.grad_norm"].item() - metrics1["grad_norm"]) <= 1e-5 * metrics1["grad_norm"]
    halves = sum(r["dp.loss"].item() for r in tp_ranks) / len(tp_ranks)
    assert abs(halves - loss1) <= LOSS_REL * abs(loss1)
    for name, want in grads1.items():
        scale = max(want.abs().max().item(), 1e-12)
        for r in tp_ranks:
            assert (r[f"dp.grad.{name}"] - want).abs().max().item() <= TP_GRAD_REL * scale, name
        assert torch.equal(tp_ranks[0][f"dp.param.{name}"], tp_ranks[1][f"dp.param.{name}"]), name
        assert (tp_ranks[0][f"dp.param.{name}"] - params1[name]).abs().max().item() <= 2 * LR * (1 + 1e-3)
