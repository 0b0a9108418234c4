"""Preference optimisation (DPO pairs and KTO labels, SFT regulariser) gives the same losses and
held-out metrics on Megatron as on JAX, on the same pairs, from the same weights, through the
same run loop (mugv.run.driver with mugv.run.tasks.PreferenceTask) and the same draws (mugv.rng).

Tolerances. Step 1 starts from identical weights on both backends, so its losses and rewards
differ only by float32 summation order: 1e-5 relative. Afterwards the weights themselves differ at
rounding level (Adam turns rounding-level gradients into steps of up to lr; tests/
test_cross_backend_training.py), which moves a per-sample error e by a few 1e-6 over four steps
(measured: up to 2.1e-6). The implicit rewards are β·(e − e_ref) with β = 200, so rewards and
margins are held to β·5e-6 = 1e-3 absolute; a DPO loss −log σ(m) moves by at most loss·|Δm|, so
losses are held to 1e-3 relative (measured: 4e-5). At step 0 policy and reference are the same
weights: every held-out margin is exactly 0 on both backends.
"""

import json
import os

import numpy as np
import pytest

from configs import tiny_preference
from mugv.data import preference as pref_data
from mugv_jax.train import backend as jax_train
from mugv_megatron.train import backend as megatron_train

GOLDEN = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "dit_tiny", "weights.safetensors"
)
STEPS = 4
STEP1_REL = 1e-5
ERR_ABS = 5e-6  # per-sample error difference once the weights have diverged
REWARD_ABS = 200 * ERR_ABS  # β · ERR_ABS
LOSS_REL = REWARD_ABS  # |Δ(−log σ(m))| ≤ loss · |Δm|


def _config(labels, heldout):
    c = tiny_preference.get_config(labels)
    c.preference.heldout_labels = heldout
    c.preference.eval_every = STEPS
    c.preference.heldout_batches = 2
    c.num_steps = STEPS
    c.log_every = 1
    c.checkpoint_every = STEPS
    c.async_checkpoint = False
    c.init_from, c.init_weights = GOLDEN, "raw"
    return c


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "tensorboard", "metrics.jsonl"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref_parity")
    # Pairs (source "motion") and good/bad labels (source "physics"), interleaved step by step.
    labels = pref_data.write_synthetic(str(d / "train"), seed=0, pairs_per_prompt=1)
    heldout = pref_data.write_synthetic(str(d / "heldout"), seed=1, pairs_per_prompt=1)
    jax_train.train(_config(labels, heldout), str(d / "jax"))
    megatron_train.train(_config(labels, heldout), str(d / "megatron"))
    return _rows(str(d / "jax")), _rows(str(d / "megatron"))


def test_per_step_losses_match(runs):
    j, m = runs
    steps_j = [r for r in j if "loss" in r]
    steps_m = [r for r in m if "loss" in r]
    assert [r["step"] for r in steps_j] == [r["step"] for r in steps_m] == list(range(1, STEPS + 1))
    kinds = []
    for a, b in zip(steps_j, steps_m):
        kind = "dpo" if "dpo/loss" in a else "kto"
        kinds.append(kind)
        assert f"{kind}/loss" in b, (a, b)
        first = a["step"] == 1
        for key in ("loss", "preference_loss", "sft_loss"):
            k = f"{kind}/{key}"
            tol = (STEP1_REL if first else LOSS_REL) * abs(a[k])
            assert abs(a[k] - b[k]) <= tol, (k, a["step"], a[k], b[k])
        k = f"{kind}/reward_margin"
        tol = STEP1_REL * max(abs(a[k]), 1.0) if first else REWARD_ABS
        assert abs(a[k] - b[k]) <= tol, (k, a["step"], a[k], b[k])
    assert set(kinds) == {"dpo", "kto"}


def test_heldout_metrics_match(runs):
    j, m = runs
    ev_j = [r for r in j if any(k.startswith("heldout/") for k in r)]
    ev_m = [r for r in m if any(k.startswith("heldout/") for k in r)]
    assert [r["step"] for r in ev_j] == [r["step"] for r in ev_m] == [0, STEPS]
    # Step 0: the policy is the reference — margins are exactly zero on both backends.
    assert ev_j[0]["heldout/dpo/reward_margin"] == 0.0 == ev_m[0]["heldout/dpo/reward_margin"]
    for a, b in zip(ev_j, ev_m):
        keys = sorted(k for k in a if k.startswith("heldout/"))
        assert keys == sorted(k for k in b if k.startswith("heldout/"))
        for k in keys:
            tol = LOSS_REL * abs(a[k]) if k.endswith("loss") else REWARD_ABS
            assert abs(a[k] - b[k]) <= max(tol, 1e-7), (k, a[k], b[k], np.abs(a[k] - b[k]))
