"""Activation recompute of the Megatron layer stack, and its hardware-FLOPs count.

Recompute re-runs the same kernels on the same inputs (no dropout in the model), so gradients
and trained weights must equal the no-recompute run's exactly (float32 parameters, and bf16
parameters under bf16 autocast as the GPU path runs; CPU); the tests also check that the re-run
really happens and that fewer activations are kept. (float32 parameters under bf16 autocast do
not run backward on CPU at all: megatron's linear layers restore only CUDA autocast in backward.)
"""

import numpy as np
import pytest
import torch

from mugv import flops
from mugv.config import get_config
from mugv.geometry import num_video_tokens
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_megatron.model import build as dit
from mugv_megatron.model import recompute
from mugv_megatron.parallel import state as parallel
from mugv_megatron.train import objective as obj

CFG = get_config("tiny")
OBJECTIVE = ObjectiveConfig(i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.25)
LATENT = (2, CFG.in_channels, 3, 4, 6)


def source():
    from mugv.data.synthetic import Bucket, SyntheticTextToLatent

    return SyntheticTextToLatent([Bucket(3, 4, 6, 2)], in_channels=CFG.in_channels, text_dim=CFG.text_dim)


def build(dtype=torch.float32):
    parallel.setup(1)
    torch.manual_seed(0)
    return dit.build_model(CFG, params_dtype=dtype)


def inputs():
    batch = source().batch(0)
    batch.pop("prompt_id")
    null = torch.randn(CFG.max_text_tokens, CFG.text_dim, generator=torch.Generator().manual_seed(1))
    draws = obj.draw(np.random.default_rng(4), batch["latents"].shape, OBJECTIVE)
    return obj.prepare(batch, null, OBJECTIVE, draws)


def run(mode, dtype):
    """Loss, grads, activation bytes kept for backward, forward calls of layer 0 and of its
    self-attention's core attention."""
    model = build(dtype)
    calls = {"layer": 0, "core": 0}
    # A pre-hook: torch stops a recompute as soon as it has what backward needs, before the end.
    model.decoder.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
    core = model.decoder.layers[0].self_attention.core_attention
    original = core.forward

    def counted(*a, **k):
        calls["core"] += 1
        return original(*a, **k)

    core.forward = counted
    recompute.apply(model, mode)
    kept = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            kept[0] += t.numel() * t.element_size()
        return t

    (x, target, _) = inputs()
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
    ):
        out = model(**x)
    loss, _ = obj.masked_frame_mse(out[:, : CFG.in_channels].float(), target, x["x_mask"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, kept[0], calls


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def results():
    return {(mode, d): run(mode, dtype) for mode in recompute.MODES for d, dtype in DTYPES.items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gradients_equal_no_recompute(results, mode, dtype):
    loss0, grads0, _, _ = results["none", dtype]
    loss, grads, _, _ = results[mode, dtype]
    assert torch.isfinite(loss) and torch.equal(loss, loss0)
    for n, g in grads0.items():
        assert g.abs().max() > 0, n
        assert torch.equal(grads[n], g), n  # tolerance: none (bit-exact)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_recompute_reruns_and_keeps_less(results, dtype):
    kept = {m: results[m, dtype][2] for m in recompute.MODES}
    calls = {m: results[m, dtype][3] for m in recompute.MODES}
    assert calls["none"] == {"layer": 1, "core": 1}
    assert calls["full"] == {"layer": 2, "core": 2}  # the whole layer again in backward
    assert calls["selective"] == {"layer": 1, "core": 2}  # only the core attention again
    assert kept["full"] < kept["selective"] < kept["none"], kept


def test_mode_is_recorded_in_megatron_config():
    model = build()
    recompute.apply(model, "full")
    tc = model.config
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "uniform", 1)
    model = build()
    recompute.apply(model, "selective")
    assert (model.config.recompute_granularity, model.config.recompute_modules) == ("selective", ["core_attn"])
    with pytest.raises(ValueError, match="config.megatron.recompute"):
        recompute.check("block")


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_trainer_steps_equal_with_recompute(mode):
    from mugv_megatron.train.step import Trainer

    parallel.setup(1)
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=0, grad_accum_steps=2)
    batch = source().batch(0)
    batch.pop("prompt_id")
    out = []
    for m in ("none", mode):
        tr = Trainer(CFG, cfg, OBJECTIVE, seed=2, use_megatron_optimizer=False, recompute=m)
        metrics = [tr.train_step(batch) for _ in range(2)]
        out.append((metrics, {n: p.detach().clone() for n, p in tr.module.named_parameters()}))
    (m0, w0), (m1, w1) = out
    assert [m["loss"] for m in m0] == [m["loss"] for m in m1]
    for n in w0:
        assert torch.equal(w0[n], w1[n]), n


def test_hardware_flops_of_recompute_policies():
    cfg = get_config("10b")
    n, text, b = num_video_tokens((14, 160, 90), cfg), 300, 2
    model = flops.step_flops(cfg, b, n, text)
    hw = {p: flops.hardware_step_flops(cfg, b, n, text, p) for p in flops.RECOMPUTE_PARTS}
    for policy in ("none", "dots"):
        assert hw[policy] == model
    assert hw["selective"] == hw["dots_no_batch"] == hw["offload_dots"]
    assert hw["full"].forward == model.forward
    c, s = cfg.hidden_size, n + 2
    attention = cfg.depth * b * (4 * s * s * c + 4 * s * text * c)
    assert hw["selective"].train - model.train == pytest.approx(attention, rel=1e-12)
    # Full recompute re-runs every layer: all of the forward but the embedders and final layer
    # (< 0.5 % at 10B), i.e. 4x forward instead of 3x.
    assert hw["full"].train / model.train == pytest.approx(4 / 3, rel=0.005)
    assert hw["full"].train < 4 / 3 * model.train
    with pytest.raises(ValueError, match="unknown recompute"):
        flops.hardware_step_flops(cfg, b, n, text, "block")
