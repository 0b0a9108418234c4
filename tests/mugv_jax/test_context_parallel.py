"""Context parallel (Ulysses, ring) over the mesh's `context` axis equals one device.

The model is small but has 8 heads (so Ulysses can split them 8 ways) and the latent shape
(3 frames, 6×8) gives 3·3·4 + 2 = 38 tokens: not a multiple of 4 or 8, so padding with masked
keys is exercised, and the grid is non-square and multi-frame.
"""

import jax
import numpy as np
import pytest

from mugv.config import DiTConfig
from mugv.data.synthetic import Bucket, SyntheticTextToLatent
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_jax.dit.model import RuntimeOptions
from mugv_jax.train import step as tr
from tests.trainer_helpers import make_mesh, to_numpy

# float32: context parallel reorders reductions (softmax blocks, all-to-all) only.
RTOL = 1e-5
CONFIG = DiTConfig(depth=2, hidden_size=96, num_heads=8, text_dim=32, max_text_tokens=16)


def _trainer(shape, mode):
    return tr.Trainer(
        CONFIG,
        RuntimeOptions(context_parallel=mode),
        OptimConfig(learning_rate=1e-3, warmup_steps=0),
        ObjectiveConfig(i2v_prob=0.5, caption_dropout_prob=0.25),
        make_mesh(shape),
    )


def _loss_fn(t):
    return jax.value_and_grad(t.loss_and_metrics, has_aux=True)


def _run(t, batch):
    state = t.init_state(0)
    args = (state["params"], state["null_text"], t.put_batch(batch), jax.random.PRNGKey(7))
    jaxpr = str(jax.make_jaxpr(_loss_fn(t))(*args))
    (loss, _), grads = jax.jit(_loss_fn(t))(*args)
    return float(loss), to_numpy(grads), jaxpr


@pytest.fixture(scope="module")
def reference():
    src = SyntheticTextToLatent([Bucket(3, 6, 8, 4)], in_channels=CONFIG.in_channels, text_dim=CONFIG.text_dim)
    batch = src.batch(0)
    batch.pop("prompt_id")
    loss, grads, _ = _run(_trainer((1, 1, 1, 1), "none"), batch)
    return loss, grads, batch


@pytest.mark.parametrize(
    "mode,shape",
    [
        ("ulysses", (1, 2, 2, 2)),  # context 2 × fsdp 2 × tensor 2
        ("ring", (1, 2, 2, 2)),
        ("ulysses", (1, 1, 2, 4)),  # context 4 × tensor 2 (38 tokens padded to 40)
        ("ring", (1, 1, 1, 8)),  # context 8 (padded to 40)
    ],
)
def test_context_parallel_gives_single_device_loss_and_gradients(reference, mode, shape):
    ref_loss, ref_grads, batch = reference
    loss, grads, jaxpr = _run(_trainer(shape, mode), batch)
    # The explicit collective really is in the program (not a silent fallback to XLA's choice).
    assert ("all_to_all" if mode == "ulysses" else "ppermute") in jaxpr
    assert loss == pytest.approx(ref_loss, rel=RTOL)
    worst = 0.0
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        worst = max(worst, float(np.abs(g - r).max()) / max(float(np.abs(r).max()), 1e-12))
    print(
        f"{mode} {shape}: loss rel error {abs(loss - ref_loss) / abs(ref_loss):.2e}, "
        f"worst gradient rel error {worst:.2e}"
    )
    assert worst <= RTOL, f"worst relative gradient error {worst:.2e}"


def test_ulysses_rejects_heads_not_divisible_by_context():
    t = tr.Trainer(
        CONFIG.replace(hidden_size=36, num_heads=6),
        RuntimeOptions(context_parallel="ulysses"),
        OptimConfig(),
        ObjectiveConfig(),
        make_mesh((1, 1, 1, 4)),
    )
    src = SyntheticTextToLatent([Bucket(2, 4, 4, 4)], in_channels=CONFIG.in_channels, text_dim=CONFIG.text_dim)
    batch = src.batch(0)
    batch.pop("prompt_id")
    state = jax.eval_shape(lambda: t.init_state(0))
    with pytest.raises(ValueError, match="ulysses.*6 heads.*context degree 4"):
        jax.eval_shape(t.loss_and_metrics, state["params"], state["null_text"], batch, jax.random.PRNGKey(0))


def test_runtime_options_parse_backend_and_mode():
    o = RuntimeOptions(attention="chunked+ring")
    assert (o.attention, o.context_parallel) == ("chunked", "ring")
    with pytest.raises(ValueError, match="context_parallel"):
        RuntimeOptions(context_parallel="stripes")
