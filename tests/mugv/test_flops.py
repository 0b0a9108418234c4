"""The shared FLOPs definition against XLA's own count of the compiled forward pass."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mugv_jax.dit as dit
from mugv import flops
from mugv.config import get_config
from mugv.geometry import num_video_tokens

# Our count covers matmuls only; XLA also counts element-wise ops (norms, softmax, RoPE, GELU),
# a few percent at this size. XLA's cost analysis counts a scanned (while-loop) body once, so the
# comparison uses one layer.
XLA_AGREEMENT = 0.10


def test_analytic_forward_flops_match_xla_cost_analysis():
    cfg = get_config("tiny", depth=1)
    model = dit.init(cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b, latent, text = 2, (4, 8, 12), 10
    x = jnp.zeros((b, cfg.in_channels, *latent))
    args = (x, jnp.full((b,), 500.0), jnp.zeros((b, 1, text, cfg.text_dim)))
    fn = lambda p, *a: dit.forward(p, cfg, model.options, *a, fps=jnp.full((b,), 24.0))
    compiled = jax.jit(fn).lower(params, *args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = float(cost["flops"])
    ours = flops.step_flops(cfg, b, num_video_tokens(latent, cfg), text).forward
    assert abs(ours - xla) / xla < XLA_AGREEMENT, (ours, xla)
    assert flops.step_flops(cfg, b, 96, text).train == 3 * flops.step_flops(cfg, b, 96, text).forward


def test_10b_720p_flops_and_mfu():
    cfg = get_config("10b")
    n = num_video_tokens((14, 160, 90), cfg)  # 720p, 105 frames
    f = flops.forward_flops_per_sample(cfg, n, 300)
    # Per layer: 14·C² of weights act on the N+2 video tokens (qkv 3, proj 1, cross q 1, cross proj 1,
    # MLP 8), cross k/v (2·C²) on the 300 text tokens, and attention 4·S·S'·C for both attentions.
    c, s = 3456, n + 2
    by_hand = 56 * (2 * s * 14 * c * c + 2 * 300 * 2 * c * c + 4 * s * s * c + 4 * s * 300 * c)
    assert f == pytest.approx(by_hand, rel=0.005)  # the rest (embedders, final layer) is < 0.5 %
    assert flops.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_for("TPU v5p") == 459e12 and flops.peak_flops_for("TPU v6e") == 918e12
    assert flops.peak_flops_for("cpu") is None and flops.mfu(1e12, 1.0, 1, None) is None
    assert flops.mfu(989e12, 2.0, 1, 989e12) == pytest.approx(0.5)


def test_lora_step_flops_match_xla_cost_analysis_of_the_adapter_gradients():
    # A LoRA step differentiates only the adapters: no weight gradients of the frozen base.
    from mugv.lora import LoraConfig
    from mugv_jax.dit import lora as dit_lora
    from mugv_jax.dit.model import RuntimeOptions

    cfg, lora = get_config("tiny", depth=1), LoraConfig(rank=4, alpha=8.0)
    base = nnx.to_pure_dict(nnx.state(dit.init(cfg), nnx.Param))
    adapters = jax.tree.map(jnp.asarray, dit_lora.init_params(cfg, lora))
    b, latent, text = 2, (4, 8, 12), 10
    args = (jnp.zeros((b, cfg.in_channels, *latent)), jnp.full((b,), 500.0), jnp.zeros((b, 1, text, cfg.text_dim)))
    opts = RuntimeOptions(lora_scale=lora.scale)
    loss = lambda a, w: jnp.sum(dit.forward(dit_lora.merge(a, w), cfg, opts, *args, fps=jnp.full((b,), 24.0)) ** 2)
    cost = jax.jit(jax.grad(loss)).lower(adapters, base).compile().cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    n = num_video_tokens(latent, cfg)
    ours = flops.lora_step_flops(cfg, b, n, text, lora)
    assert abs(ours.train - xla) / xla < XLA_AGREEMENT, (ours.train, xla)  # measured: ours 5% above
    # Well below a full step (3× forward): the base's weight gradients are gone.
    assert ours.train < 0.8 * flops.step_flops(cfg, b, n, text).train
