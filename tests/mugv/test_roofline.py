"""The roofline's FLOP accounting agrees with mugv/flops.py; its classes, overlap and padding."""

import pytest

from mugv import flops, roofline
from mugv.config import get_config
from mugv.geometry import num_video_tokens


def test_roofline_counts_the_hardware_flops_of_every_remat_policy():
    cfg = get_config("10b")
    n, text, batch = num_video_tokens((14, 160, 90), cfg), 300, 8
    for policy in ("none", "full", "dots_no_batch", "save_qkv_proj", "save_attn_out", "save_qkv_attn"):
        cost = roofline.step_cost(cfg, batch, n, text, policy, hardware_factor=1.0, params=0)
        total = cost.matmul_flops + cost.attention_fwd_flops + cost.attention_bwd_flops
        assert total == pytest.approx(flops.hardware_step_flops(cfg, batch, n, text, policy).train, rel=1e-12), policy
    # What a named save-list keeps is not recomputed: the qkv projection, the self-attention kernel.
    parts = flops.layer_parts(cfg, n, text)
    hw = lambda p: flops.hardware_step_flops(cfg, batch, n, text, p).train
    assert hw("full") - hw("save_qkv_proj") == pytest.approx(batch * cfg.depth * parts["qkv"])
    assert hw("full") - hw("save_attn_out") == pytest.approx(batch * cfg.depth * parts["self_attention"])
    # Padding the head dim multiplies only the attention kernels' work.
    padded = roofline.step_cost(cfg, batch, n, text, "full", hardware_factor=128 / 72, params=0)
    plain = roofline.step_cost(cfg, batch, n, text, "full", hardware_factor=1.0, params=0)
    assert padded.matmul_flops == plain.matmul_flops
    assert padded.attention_bwd_flops == pytest.approx(plain.attention_bwd_flops * 128 / 72)


def test_roofline_of_a_lora_step_counts_no_weight_gradients_of_the_base():
    from mugv.lora import LoraConfig

    cfg, lora = get_config("10b"), LoraConfig(rank=64, alpha=32.0)
    n, text, batch = num_video_tokens((14, 160, 90), cfg), 300, 8
    total = lambda c: c.matmul_flops + c.attention_fwd_flops + c.attention_bwd_flops
    model = flops.lora_step_flops(cfg, batch, n, text, lora).train
    cost = lambda policy: roofline.step_cost(cfg, batch, n, text, policy, hardware_factor=1.0, params=0, lora=lora)
    assert total(cost("none")) == pytest.approx(model, rel=1e-12)
    # Full remat runs each layer's forward again, the adapters' included.
    again = (
        batch * cfg.depth * (sum(flops.layer_parts(cfg, n, text).values()) + flops.lora_layer_flops(cfg, n, text, lora))
    )
    assert total(cost("full")) == pytest.approx(model + again, rel=1e-12)
    # The attention is unchanged (its backward is input gradients anyway); the matmuls shrink.
    full = roofline.step_cost(cfg, batch, n, text, "full", hardware_factor=1.0, params=0)
    assert cost("full").attention_bwd_flops == full.attention_bwd_flops
    assert 0.7 < cost("full").matmul_flops / full.matmul_flops < 0.8


def test_head_dim_72_costs_per_kernel_and_platform():
    assert roofline.hardware_factor("splash", 72, "tpu") == pytest.approx(128 / 72)
    assert roofline.hardware_factor("xla", 72, "tpu") == pytest.approx(128 / 72)  # the MXU pads too
    assert roofline.hardware_factor("cudnn", 72, "gpu") == pytest.approx((80 + 72) / 144)
    assert roofline.hardware_factor("cudnn", 128, "gpu") == 1.0
    assert roofline.hardware_factor("chunked", 72, "gpu") == 1.0


def test_prediction_is_per_op_class_with_collectives_overlapped():
    dev = roofline.DEVICES["h100"]
    cost = roofline.StepCost(
        matmul_flops=dev.peak * roofline.MATMUL_EFFICIENCY,  # 1 s
        attention_fwd_flops=dev.peak * roofline.ATTENTION_EFFICIENCY["fwd"],  # 1 s
        attention_bwd_flops=2 * dev.peak * roofline.ATTENTION_EFFICIENCY["bwd"],  # 2 s
        elementwise_bytes=dev.hbm_bandwidth * roofline.HBM_EFFICIENCY,  # 1 s
        collective_seconds=3.0,
    )
    p = roofline.predict(cost, dev, model_flops=2.5 * dev.peak)
    assert (p.matmul, p.attention, p.elementwise, p.collectives) == pytest.approx((1, 3, 1, 3))
    assert p.seconds == pytest.approx(5) and p.serial_seconds == pytest.approx(8)
    assert p.mfu(dev.peak) == pytest.approx(0.5)
    slow = roofline.predict(roofline.StepCost(0, 0, 0, 0, collective_seconds=7.0), dev, model_flops=0)
    assert slow.seconds == 7.0  # collectives longer than compute set the step time
