"""LoRA on the Megatron DiT (mugv_megatron/model/lora.py) against the one definition and the JAX
DiT (float32, tests/golden/dit_tiny weights, 3 latent frames of 4x6: non-square, multi-frame):
with B = 0 the model is the base model bit for bit; with trained adapters (a nonzero B, so both
factors get gradients) the loss and every adapter gradient equal JAX's; base weights get none.

Tolerances as the full-model step (tests/cross_backend/test_cross_backend_training.py): loss 1e-5
relative, gradients 1e-4 relative to each tensor's largest entry (the two backends sum in
different orders; measured values printed)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mugv.config import get_config
from mugv.layouts import jax as jax_layout
from mugv.layouts import megatron as layout
from mugv.lora import LoraConfig, init_adapters
from mugv_megatron.model import build
from mugv_megatron.model import lora as mlora
from mugv_megatron.parallel import state as parallel

WEIGHTS = Path(__file__).parent.parent / "golden" / "dit_tiny" / "weights.safetensors"
CFG = get_config("tiny")
LOSS_REL = 1e-5
GRAD_REL = 1e-4
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
    out = model(**ins)
    loss = _loss(out, torch.from_numpy(_target()), torch.from_numpy(_keep()))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    return dict(base=base_out, fresh=fresh_out, out=out.detach(), loss=float(loss), grads=grads, frozen=frozen)


@pytest.fixture(scope="module")
def jax_side():
    import jax
    import jax.numpy as jnp

    from mugv_jax.dit import checkpoint as dit_ckpt
    from mugv_jax.dit import lora as dit_lora
    from mugv_jax.dit.model import RuntimeOptions, forward

    base = jax_layout.unflatten(dit_ckpt.params_from_release_items(load_file(WEIGHTS).items(), CFG))
    flat = {}
    for name, arr in _trained_adapters().items():
        path, layer, a = jax_layout.adapter_to_jax(name, arr, CFG)
        flat.setdefault(path, [None] * CFG.depth)[layer] = a
    adapters = jax_layout.unflatten({k: np.stack(v) for k, v in flat.items()})
    opts = RuntimeOptions(lora_scale=LORA.scale)
    ins, target = _inputs(), _target()

    def loss_fn(ad):
        out = forward(dit_lora.merge(base, ad), CFG, opts, **ins)
        return _loss(out, target, jnp.asarray(_keep()))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(adapters)
    release = {}
    for path, g in jax_layout.flatten(grads).items():
        for i in range(CFG.depth):
            name, a = jax_layout.adapter_to_release(path, np.asarray(g[i]), i)
            release[name] = a
    return float(loss), release


def test_b_zero_is_the_base_model_bit_for_bit(megatron):
    assert torch.equal(megatron["fresh"], megatron["base"])
    assert float((megatron["out"] - megatron["base"]).abs().max()) > 1e-3  # trained adapters act


def test_only_the_adapters_get_gradients(megatron):
    assert megatron["frozen"] == []
    assert set(megatron["grads"]) == {layout.megatron_name(k) for k in init_adapters(CFG, LORA)}


def test_loss_and_adapter_gradients_match_jax(megatron, jax_side):
    j_loss, j_grads = jax_side
    m_loss = megatron["loss"]
    print(f"loss megatron {m_loss:.8f} jax {j_loss:.8f} rel {abs(m_loss - j_loss) / abs(j_loss):.2e}")
    assert abs(m_loss - j_loss) <= LOSS_REL * abs(j_loss)
    m_grads = {}
    for n, g in megatron["grads"].items():
        for name, a in layout.megatron_to_release(n, g, CFG):
            m_grads[name] = a
    assert set(m_grads) == set(j_grads)
    worst = 0.0
    for name, want in j_grads.items():
        scale = max(float(np.abs(want).max()), 1e-12)
        err = float(np.abs(m_grads[name] - want).max())
        assert err <= GRAD_REL * scale, (name, err, scale)
        worst = max(worst, err / scale)
    print(f"worst relative adapter gradient error {worst:.2e}")
