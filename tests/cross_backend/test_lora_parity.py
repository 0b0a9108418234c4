"""LoRA on the Megatron DiT (mugv_megatron/model/lora.py) against the one definition and the JAX
DiT, float32, tests/golden/dit_tiny weights:
- model level (3 latent frames of 4x6, B=2): with B = 0 the model is the frozen base bit for bit;
  only adapters get gradients;
- trainer level, mirroring tests/cross_backend/test_cross_backend_training.py (its batch, random
  numbers and null caption; conditioning frames and dropped captions): with trained adapters (a
  nonzero B, so both factors get gradients) one step of each trainer gives the same loss, adapter
  gradients and new adapters; Megatron TP=2 and TP=2 + sequence parallel (two spawned gloo
  processes) give the TP=1 step.

Tolerances are the full-model step's: loss 1e-5 relative, JAX ⇄ Megatron gradients 1e-4 relative
to each tensor's largest entry, TP ⇄ TP=1 gradients 1e-5 (only float32 sums reorder); new
adapters as the full-model test bounds AdamW (measured values printed)."""

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.numpy import load_file

from mugv.config import get_config
from mugv.io.torch_cpu import free_port
from mugv.layouts import jax as jax_layout
from mugv.layouts import megatron as layout
from mugv.lora import LoraConfig, init_adapters
from mugv_megatron.model import build
from mugv_megatron.model import lora as mlora
from mugv_megatron.parallel import state as parallel
from tests.cross_backend.test_cross_backend_training import LATENT, LR, OBJECTIVE, OPTIM, make_case, release_weights

WEIGHTS = Path(__file__).parent.parent / "golden" / "dit_tiny" / "weights.safetensors"
CFG = get_config("tiny")
LOSS_REL = 1e-5
GRAD_REL = 1e-4
TP_GRAD_REL = 1e-5
TP = 2
LORA = LoraConfig(rank=4, alpha=8.0, init_seed=3)


def _inputs():
    rng = np.random.default_rng(0)
    b, t, h, w = 2, 3, 4, 6
    return dict(
        x=rng.standard_normal((b, CFG.in_channels, t, h, w)).astype(np.float32),
        timestep=np.array([300.0, 700.0], np.float32),
        y=rng.standard_normal((b, 1, 5, CFG.text_dim)).astype(np.float32),
        mask=np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
        x_mask=np.array([[False, True, True], [True, True, True]]),
        fps=np.array([24.0, 24.0], np.float32),
    )


def _target():
    return np.random.default_rng(1).standard_normal((2, CFG.in_channels, 3, 4, 6)).astype(np.float32)


def _trained_adapters():
    """The definition's start with B drawn too, standing for adapters after some training."""
    rng = np.random.default_rng(4)
    init = init_adapters(CFG, LORA)
    return {
        k: (rng.standard_normal(v.shape).astype(np.float32) * 0.3 if ".lora_B." in k else v) for k, v in init.items()
    }


def _loss(out, target, keep):
    """Mean squared error over the generated frames (keep: [B, 1, T, 1, 1] of 0/1)."""
    sq = (out[:, : CFG.in_channels] - target) ** 2
    return (sq * keep).sum() / (keep.sum() * CFG.in_channels * 4 * 6)


def _keep():
    return _inputs()["x_mask"].astype(np.float32)[:, None, :, None, None]


@pytest.fixture(scope="module")
def megatron():
    parallel.setup(1)
    model = build.load(WEIGHTS, CFG)
    ins = {k: torch.from_numpy(v) for k, v in _inputs().items()}
    # The base as LoRA runs it: frozen. (megatron's linears take another matmul path for a
    # weight that needs no gradient, which moves float32 results by an ulp.)
    model.requires_grad_(False)
    with torch.no_grad():
        base_out = model(**ins)
    mlora.add_adapters(model, LORA)
    with torch.no_grad():
        fresh_out = model(**ins)
    mlora.load_adapters(model, _trained_adapters())
    exported = {k: v.numpy() for k, v in mlora.release_adapters(model).items()}
    out = model(**ins)
    loss = _loss(out, torch.from_numpy(_target()), torch.from_numpy(_keep()))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    return dict(
        base=base_out,
        fresh=fresh_out,
        out=out.detach(),
        loss=float(loss),
        grads=grads,
        frozen=frozen,
        exported=exported,
    )


def test_b_zero_is_the_base_model_bit_for_bit(megatron):
    assert torch.equal(megatron["fresh"], megatron["base"])
    assert float((megatron["out"] - megatron["base"]).abs().max()) > 1e-3  # trained adapters act


def test_adapters_load_and_export_by_release_name_bit_exact(megatron):
    trained = _trained_adapters()
    assert megatron["exported"].keys() == trained.keys()
    assert all(np.array_equal(megatron["exported"][k], trained[k]) for k in trained)


def test_only_the_adapters_get_gradients(megatron):
    assert megatron["frozen"] == []
    assert set(megatron["grads"]) == {layout.megatron_name(k) for k in init_adapters(CFG, LORA)}


# --- one trainer step on both backends ------------------------------------------------------------


def _megatron_step(batch, draws, null, sequence_parallel=False):
    """(loss, adapter grads, adapters after one step), Megatron names, this rank's shards."""
    from mugv_megatron.train.step import Trainer

    state = {k: torch.from_numpy(v) for k, v in release_weights().items()}
    tr = Trainer(
        CFG,
        OPTIM,
        OBJECTIVE,
        seed=0,
        release_state=state,
        use_megatron_optimizer=False,
        sequence_parallel=sequence_parallel,
        lora=LORA,
    )
    mlora.load_adapters(tr.module, _trained_adapters())
    tr.ema = tr._new_ema()
    tr.null_text = torch.from_numpy(null)
    rows = tr.local_rows(LATENT[0])
    loss, _, _ = tr.loss_and_grads({k: v[rows] for k, v in batch.items()}, draws.slice(rows.start, rows.stop))
    grads = {n: p.grad.detach().clone() for n, p in mlora.adapter_parameters(tr.module).items()}
    metrics = tr.train_step(batch, draws=draws)
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-7)
    params = {n: p.detach().clone() for n, p in mlora.adapter_parameters(tr.module).items()}
    assert set(tr.ema.shadow) == set(params)  # the EMA is the adapters'
    return float(loss), grads, params


def _to_release(named: dict) -> dict:
    out = {}
    for n, t in named.items():
        for name, a in layout.megatron_to_release(n, t.numpy(), CFG):
            out[name] = np.asarray(a)
    return out


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.fixture(scope="module")
def megatron_step(case):
    parallel.setup(1)
    return _megatron_step(*case)


@pytest.fixture(scope="module")
def jax_step(case):
    import jax
    import jax.numpy as jnp
    import optax

    from mugv.training import shift_ratio
    from mugv_jax.dit import checkpoint as dit_ckpt
    from mugv_jax.dit import lora as dit_lora
    from mugv_jax.dit.model import RuntimeOptions
    from mugv_jax.parallel import mesh as mesh_lib
    from mugv_jax.train import objective as jobj
    from mugv_jax.train import step as jtr

    batch, draws, null = case
    base = jax_layout.unflatten(dit_ckpt.params_from_release_items(load_file(WEIGHTS).items(), CFG))
    adapters = dit_lora.from_release(_trained_adapters(), CFG)
    mesh = mesh_lib.build_mesh(dict(data=1, fsdp=1, tensor=1, context=1), devices=jax.devices()[:1])
    trainer = jtr.Trainer(CFG, RuntimeOptions(lora_scale=LORA.scale), OPTIM, OBJECTIVE, mesh, lora=LORA)
    # The JAX objective's own functions on the shared random numbers (as the full-model test).
    x0 = jnp.asarray(batch["latents"])
    frames, h, w = x0.shape[2:]
    t = jobj.shift_t(
        jax.nn.sigmoid(jnp.asarray(draws.u)) * 1000.0, shift_ratio((frames, h, w), OBJECTIVE.shift_num_frames)
    )
    eps = jnp.asarray(draws.eps)
    x_mask = jnp.arange(frames)[None, :] >= jnp.asarray(draws.n_cond)[:, None]
    xt = jnp.where(x_mask[:, None, :, None, None], jobj.noisy_latents(x0, eps, t), x0)
    drop = jnp.asarray(draws.drop)
    y = jnp.where(drop[:, None, None, None], jnp.asarray(null)[: batch["y"].shape[2]][None, None], batch["y"])
    mask = jnp.where(drop[:, None], 1, jnp.asarray(batch["mask"]))
    inputs = dict(x=xt, timestep=t, y=y, mask=mask, x_mask=x_mask, fps=jnp.asarray(batch["fps"]), frame_indice=None)

    def step(adapters, inputs, target, t):
        loss_fn = lambda a: trainer.loss_on_inputs(dit_lora.merge(base, a), inputs, target, t)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters)
        updates, _ = trainer.optimizer.update(grads, trainer.optimizer.init(adapters), adapters)
        return loss, grads, optax.apply_updates(adapters, updates)

    loss, grads, new = jax.jit(step)(adapters, inputs, x0 - eps, t)

    return float(loss), dit_lora.to_release(grads), dit_lora.to_release(new)


def test_one_lora_step_matches_jax(megatron_step, jax_step):
    m_loss, m_grads, m_new = megatron_step[0], _to_release(megatron_step[1]), _to_release(megatron_step[2])
    j_loss, j_grads, j_new = jax_step
    print(f"loss megatron {m_loss:.8f} jax {j_loss:.8f} rel {abs(m_loss - j_loss) / abs(j_loss):.2e}")
    assert abs(m_loss - j_loss) <= LOSS_REL * abs(j_loss)
    assert set(m_grads) == set(j_grads) == set(_trained_adapters())
    worst = 0.0
    before = _trained_adapters()
    for name, want in j_grads.items():
        scale = max(float(np.abs(want).max()), 1e-12)
        err = float(np.abs(m_grads[name] - want).max())
        assert err <= GRAD_REL * scale, (name, err, scale)
        worst = max(worst, err / scale)
        # AdamW moves by lr·(g/(|g|+eps) + wd·w): equal where |g| is well above the gradient
        # bound, within 2·lr where a near-zero gradient's sign may differ.
        sure = np.abs(want) > 10 * GRAD_REL * scale
        d = np.abs((m_new[name] - before[name]) - (j_new[name] - before[name]))
        assert d[sure].max(initial=0.0) <= 1e-3 * LR and d.max() <= 2 * LR * (1 + 1e-3), name
    print(f"worst relative adapter gradient error {worst:.2e}")


# --- TP = 2 (and + sequence parallel) equals TP = 1 ----------------------------------------------


def _tp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    parallel.setup(TP, rank=rank, world_size=TP, master_port=port, timeout=datetime.timedelta(seconds=120))
    results = {}
    for variant, sp in (("tp", False), ("tp_sp", True)):
        loss, grads, params = _megatron_step(*make_case(), sequence_parallel=sp)
        results[f"{variant}.loss"] = torch.tensor(loss)
        results.update({f"{variant}.grad.{n}": g for n, g in grads.items()})
        results.update({f"{variant}.param.{n}": p for n, p in params.items()})
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    parallel.teardown()


@pytest.fixture(scope="module")
def tp_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_tp")
    mp.spawn(_tp_worker, args=(free_port(), str(out)), nprocs=TP, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(TP)]


@pytest.mark.parametrize("variant", ["tp", "tp_sp"])
def test_tp2_lora_step_matches_tp1(tp_ranks, megatron_step, variant):
    loss1, grads1, params1 = megatron_step
    merge = lambda prefix, n: layout.tp_merge(n, [r[prefix + n] for r in tp_ranks], lambda a, d: torch.cat(a, d))
    for r in tp_ranks:
        assert abs(r[f"{variant}.loss"].item() - loss1) <= LOSS_REL * abs(loss1)
    worst = 0.0
    for name, want in grads1.items():
        # A whole factor is the same on both ranks (summed over TP under SP), a split one merges.
        if layout.tp_split_rule(name) == "replicated":
            assert torch.equal(tp_ranks[0][f"{variant}.grad.{name}"], tp_ranks[1][f"{variant}.grad.{name}"]), name
        got = merge(f"{variant}.grad.", name)
        scale = max(want.abs().max().item(), 1e-12)
        assert (got - want).abs().max().item() <= TP_GRAD_REL * scale, name
        worst = max(worst, (got - want).abs().max().item() / scale)
        assert (merge(f"{variant}.param.", name) - params1[name]).abs().max().item() <= 2 * LR * (1 + 1e-3), name
    print(f"{variant}: worst relative adapter gradient error {worst:.2e}")
