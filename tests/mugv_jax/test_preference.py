"""Preference optimisation: DPO/KTO against hand-computed values, and a short DPO+KTO run."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_preference
from mugv.data import preference as D
from mugv_jax.train import backend as train_lib
from mugv_jax.train import preference as P


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_by_hand():
    ew, rw, el, rl = jnp.array([1.0, 2.0]), jnp.array([1.5, 2.0]), jnp.array([2.0, 1.0]), jnp.array([1.0, 1.2])
    beta = 2.0
    # pair 0: -(2/2)*((1-1.5) - (2-1)) = 1.5 ; pair 1: -1*((0) - (-0.2)) = -0.2
    loss, margin = P.dpo_loss(ew, rw, el, rl, beta)
    np.testing.assert_allclose(margin, [1.5, -0.2], rtol=1e-6)
    want = -(math.log(_sig(1.5)) + math.log(_sig(-0.2))) / 2
    assert abs(float(loss) - want) < 1e-6


def test_kto_loss_by_hand():
    err, ref = jnp.array([1.0, 2.0, 0.5]), jnp.array([1.2, 1.5, 0.5])
    good = jnp.array([True, False, True])
    loss, reward, z = P.kto_loss(err, ref, good, beta=1.0, lambda_d=1.0, lambda_u=2.0)
    np.testing.assert_allclose(reward, [0.2, -0.5, 0.0], atol=1e-6)
    assert float(z) == 0.0  # mean reward -0.1 < 0 -> reference point 0
    want = ((1 - _sig(0.2)) + (2 - 2 * _sig(0.5)) + (1 - _sig(0.0))) / 3
    assert abs(float(loss) - want) < 1e-6
    # A positive mean reward becomes the reference point.
    _, r2, z2 = P.kto_loss(jnp.array([0.0, 0.0]), jnp.array([1.0, 0.5]), jnp.array([True, False]), beta=1.0)
    assert abs(float(z2) - 0.75) < 1e-6


def test_label_format_errors_name_file_and_line(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text(
        json.dumps({"source": "a", "winner": "x", "loser": "y"})
        + "\n"
        + json.dumps({"source": "b", "clip": "x", "label": "meh"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"l.jsonl:2: 'label' must be"):
        D.read_labels(str(p))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    # Pairs only: the KTO path is covered by hand-computed values above; each extra loss kind in a
    # run costs two more compiles of the tiny model.
    labels = D.write_synthetic(str(d / "train"), seed=0, labels=False)
    # Held-out: different captions and patterns (another seed), same kind of artifact.
    heldout = D.write_synthetic(str(d / "heldout"), seed=1, pairs_per_prompt=1, labels=False)
    c = tiny_preference.get_config(labels)
    c.preference.heldout_labels = heldout
    c.num_steps = 24
    c.preference.eval_every = 24
    c.async_checkpoint = False
    return train_lib.train(c, str(d / "run")), d


def test_interleaving_alternates_sources(tmp_path):
    path = D.write_synthetic(str(tmp_path), seed=0)
    it = D.PreferenceIterator(D.read_labels(path), D.ClipStore(str(tmp_path / "clips")), 8)
    kinds = [D.batch_kind(it.batch(i)) for i in range(4)]
    assert kinds == ["dpo", "kto", "dpo", "kto"]
    b = it.batch(1)
    assert b["latents"].shape == (8, 24, 2, 4, 4) and set(np.unique(b["label"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(it.batch(2)["latents_w"], it.batch(2)["latents_w"])
    it.step = 5
    state = it.get_state()
    it2 = D.PreferenceIterator(D.read_labels(path), D.ClipStore(str(tmp_path / "clips")), 8)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["latents"], it.batch(5)["latents"])


def test_short_run_improves_heldout_preferences(run):
    s, _ = run
    first, last = s["evaluations"][0], s["evaluations"][-1]
    assert first["step"] == 0 and last["step"] == 24
    # At the start policy == reference: margin 0, loss log 2 (measured after 40 interleaved
    # DPO/KTO steps: held-out DPO margin 27, loss 0.003).
    assert abs(first["heldout/dpo/reward_margin"]) < 1e-6
    assert abs(first["heldout/dpo/preference_loss"] - math.log(2)) < 1e-5
    assert last["heldout/dpo/preference_loss"] < 0.5 * first["heldout/dpo/preference_loss"]
    assert last["heldout/dpo/reward_margin"] > 1.0
    assert last["heldout/dpo/accuracy"] > 0.9


def test_rdpo_pairs_regenerate_real_clips_with_the_policy(run):
    s, d = run
    from mugv.config import get_config
    from mugv_jax.dit.model import RuntimeOptions

    it = D.PreferenceIterator(
        D.read_labels(str(d / "heldout" / "labels.jsonl")), D.ClipStore(str(d / "heldout" / "clips")), 8
    )
    pairs = it.batch(0)
    real = {"latents": pairs["latents_w"], **{k: pairs[k] for k in ("y", "mask", "fps")}}
    params = s["state"]["params"]
    light = P.rdpo_pairs(
        params, get_config("tiny"), RuntimeOptions(), real, s["state"]["null_text"], strength=0.3, num_steps=6
    )
    heavy = P.rdpo_pairs(
        params, get_config("tiny"), RuntimeOptions(), real, s["state"]["null_text"], strength=1.0, num_steps=6
    )
    assert D.batch_kind(light) == "dpo"
    np.testing.assert_array_equal(light["latents_w"], real["latents"])
    assert light["latents_l"].shape == real["latents"].shape and np.all(np.isfinite(light["latents_l"]))
    dist = lambda b: float(np.mean(np.square(b["latents_l"] - b["latents_w"])))
    # A regeneration from less noise stays closer to the real clip, but is not the clip.
    assert 0 < dist(light) < dist(heavy), (dist(light), dist(heavy))
