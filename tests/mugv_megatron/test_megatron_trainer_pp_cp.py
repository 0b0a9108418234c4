"""The Megatron trainer's step under pipeline (PP=2) and context (CP=2) parallelism equals the
one-process step, and a PP=2 checkpoint restores bit-exactly at PP=1.

One spawn of two gloo processes runs, from the golden tiny weights (2 layers: one per stage) and
the same batch and draws as tests/cross_backend/test_cross_backend_training.py, with two gradient-accumulation
micro-batches:
* PP=2: one trainer step, a torch_dist checkpoint, then a step on a batch holding a NaN;
* CP=2 (the same two processes re-initialised): one trainer step.
The test process runs the same step at TP=PP=CP=1. After one AdamW step from identical weights,
the first moment is (1 − b1) × the clipped gradient, so comparing it compares the gradients
(embedders summed over the stages, CP grads summed over the ranks); the weights move by
lr·sign(g) per element, so where the gradient is well above rounding they must agree closely.
"""

import dataclasses
import datetime
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mugv.io.torch_cpu import free_port
from mugv_megatron.parallel import state as parallel
from mugv_megatron.train import checkpointing
from tests.cross_backend.test_cross_backend_training import (
    CFG,
    LATENT,
    LR,
    OBJECTIVE,
    OPTIM,
    make_case,
    release_weights,
)

WORLD = 2
# Two micro-batches per step: the pipeline schedule runs more than one.
OPTIM2 = dataclasses.replace(OPTIM, grad_accum_steps=2)
# float32; only the order of sums differs from the one-process step (measured: loss ~1e-7
# relative, first moments ~2e-6 of each tensor's largest entry).
LOSS_REL = 1e-5
MOMENT_REL = 1e-5
# Where |g| > 1e-3 of the tensor's largest gradient, the update lr·g/(|g|+eps) is the same sign.
PARAM_ABS_STRICT = 1e-6
STRICT_FRACTION = 1e-3
LAYOUTS = ("pp", "cp")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _global(name: str, offset: int) -> str:
    m = _LAYER.match(name)
    return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else name


def _state(tr, prefix: str) -> dict:
    off = checkpointing.layer_offset(tr.module)
    out = {}
    for n, p in tr.module.named_parameters():
        g = _global(n, off)
        out[f"{prefix}.param.{g}"] = p.detach().clone()
        for kind, t in tr.optimizer.moments(p).items():
            out[f"{prefix}.{kind}.{g}"] = t.clone()
        out[f"{prefix}.ema.{g}"] = tr.ema.shadow[n].clone()
    return out


def _trainer(batch_null):
    from mugv_megatron.train.step import Trainer

    state = {k: torch.from_numpy(v) for k, v in release_weights().items()}
    tr = Trainer(CFG, OPTIM2, OBJECTIVE, seed=0, release_state=state, use_megatron_optimizer=False)
    tr.null_text = torch.from_numpy(batch_null)
    return tr


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    timeout = datetime.timedelta(seconds=300)
    batch, draws, null = make_case()
    results = {}

    parallel.setup(1, rank=rank, world_size=WORLD, master_port=port, timeout=timeout, pipeline_parallel_size=WORLD)
    tr = _trainer(null)
    m = tr.train_step(batch, draws=draws)
    results.update(_state(tr, "pp"))
    results["pp.loss"] = torch.tensor(m["loss"])
    results["pp.grad_norm"] = torch.tensor(m["grad_norm"])
    results["pp.rank"] = torch.tensor(ps.get_pipeline_model_parallel_rank())
    checkpointing.save(str(Path(out_dir) / "ckpt"), tr, {"position": 1})
    # NaN in the batch: every stage must skip the update (and agree it did).
    bad = {k: v.copy() for k, v in batch.items()}
    bad["latents"][0, 0, 0, 0, 0] = np.nan
    before = _state(tr, "x")
    m = tr.train_step(bad, draws=tr.draws(LATENT))
    after = _state(tr, "x")
    results["pp.nan_finite"] = torch.tensor(m["finite"])
    results["pp.nan_unchanged"] = torch.tensor(all(torch.equal(before[k], after[k]) for k in before))
    results["pp.nan_counters"] = torch.tensor([tr.step, tr.skipped, tr.optimizer.count])

    ps.destroy_model_parallel()
    parallel.setup(1, rank=rank, world_size=WORLD, master_port=port, timeout=timeout, context_parallel_size=WORLD)
    tr = _trainer(null)
    m = tr.train_step(batch, draws=draws)
    results.update(_state(tr, "cp"))
    results["cp.loss"] = torch.tensor(m["loss"])
    results["cp.grad_norm"] = torch.tensor(m["grad_norm"])
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    parallel.teardown()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_pp_cp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def ranks(run_dir):
    return [torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    parallel.setup(1)
    batch, draws, null = make_case()
    tr = _trainer(null)
    m = tr.train_step(batch, draws=draws)
    return m, _state(tr, "ref")


def _held(ranks, layout):
    """{global key suffix: [tensor on every rank holding it]} of one layout."""
    held = {}
    for res in ranks:
        for k, v in res.items():
            if k.startswith(f"{layout}.") and k.count(".") > 1:
                held.setdefault(k[len(layout) + 1 :], []).append(v)
    return held


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_grad_norm_match_one_process(ranks, reference, layout):
    m, _ = reference
    for res in ranks:
        assert abs(res[f"{layout}.loss"].item() - m["loss"]) <= LOSS_REL * abs(m["loss"])
        assert abs(res[f"{layout}.grad_norm"].item() - m["grad_norm"]) <= LOSS_REL * m["grad_norm"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_after_the_step_matches_one_process(ranks, reference, layout):
    _, ref = reference
    held = _held(ranks, layout)
    want_keys = {k[len("ref.") :] for k in ref}
    assert set(held) == want_keys, set(held) ^ want_keys
    worst_m, strict, total = 0.0, 0, 0
    for key, copies in held.items():
        want = ref[f"ref.{key}"]
        # Replicas (embedders on both stages, everything on both CP ranks) stay identical.
        for c in copies[1:]:
            assert torch.equal(c, copies[0]), key
        got = copies[0]
        kind, name = key.split(".", 1)
        if kind in ("exp_avg", "exp_avg_sq"):
            scale = max(want.abs().max().item(), 1e-30)
            err = (got - want).abs().max().item() / scale
            assert err <= MOMENT_REL, (key, err)
            worst_m = max(worst_m, err)
        elif kind in ("param", "ema"):
            step = 2 * LR * (1 + 1e-3) * (1.0 if kind == "param" else 1 - OPTIM2.ema_decay)
            diff = (got - want).abs()
            assert diff.max().item() <= step, key
            g = ref[f"ref.exp_avg.{name}"].abs()
            sure = g > STRICT_FRACTION * g.max()
            bound = PARAM_ABS_STRICT * (1.0 if kind == "param" else 1 - OPTIM2.ema_decay)
            assert diff[sure].max().item() <= bound if sure.any() else True, key
            strict, total = strict + int(sure.sum()), total + sure.numel()
    print(
        f"{layout}: worst first/second moment error {worst_m:.2e} of tensor max; "
        f"strictly checked weights {strict / total:.1%}"
    )
    assert strict / total > 0.5


def test_pp_stages_agree_to_skip_a_nonfinite_step(ranks):
    for res in ranks:
        assert not res["pp.nan_finite"].item()
        assert res["pp.nan_unchanged"].item()
        assert res["pp.nan_counters"].tolist() == [2, 1, 1]


def test_pp2_checkpoint_restores_bit_exactly_at_pp1(run_dir, ranks):
    """Each stage wrote its layers at their global index: a one-process trainer gets back every
    weight, Adam moment and EMA tensor of the PP=2 run exactly."""
    from mugv_megatron.train.step import Trainer

    parallel.setup(1)
    assert sorted(r["pp.rank"].item() for r in ranks) == [0, 1]
    tr = Trainer(CFG, OPTIM2, OBJECTIVE, seed=7, use_megatron_optimizer=False)
    meta = checkpointing.restore_latest(str(run_dir / "ckpt"), tr)
    assert meta["data"] == {"position": 1} and tr.step == 1 and tr.optimizer.count == 1
    got = _state(tr, "pp")
    held = _held(ranks, "pp")
    assert {k[3:] for k in got} == set(held)
    for key, copies in held.items():
        assert torch.equal(got[f"pp.{key}"], copies[0]), key
