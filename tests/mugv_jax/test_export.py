"""The real train step lowers for the pods' platforms with a fused kernel in every attention.

`jax.export(..., platforms=["tpu"])` over a `jax.sharding.AbstractMesh` whose device is a TPU v5p
runs JAX's TPU lowering, Pallas' Mosaic lowering included, on this CPU: a splash kernel becomes a
`tpu_custom_call` carrying the serialized kernel. For CUDA, cuDNN's lowering needs concrete
devices: the 8 fake CPU devices, with cuDNN's version probe answered. Nothing runs and nothing is
compiled for the chip, so these tests prove that the step traces and lowers with each kernel in
each context-parallel mode, that self- and cross-attention, forward and backward, each call the
fused kernel on the per-device operands the layout implies (inside a shard_map), and that the
step keeps the shardings the trainer planned (mugv_jax/export.py).

The model is small but has the release's head dim (72; splash pads it to 128 lanes), 8 heads, a
caption of 12 tokens, and 530 tokens: 133 per shard at context 4, so every self-attention kernel
sees a longer sequence than the caption's.
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import pytest

from mugv.config import DiTConfig
from mugv.geometry import num_tokens
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_jax import export
from mugv_jax.dit.model import RuntimeOptions
from mugv_jax.train import step as tr
from tests.helpers import run_module
from tests.trainer_helpers import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import mugv_10b  # noqa: E402

CONFIG = DiTConfig(depth=2, hidden_size=576, num_heads=8, text_dim=32, max_text_tokens=16)
BATCH, TEXT_LEN = 2, 12
LATENT = (2, 24, 44)  # 2·12·22 video tokens + start/end = 530
TOKENS = num_tokens(LATENT, CONFIG)

# mode → (mesh (data, fsdp, tensor, context), per-device [b, n, h, d] of (self q, self k, cross q,
# cross k), the collective the scheme adds). Written out so that a change in how the layout maps
# onto the kernels shows here, not only in mugv_jax/export.py.
MODES = {
    # data 2 × tensor 4: one sample and 2 heads per device, whole sequences.
    "none": ((2, 1, 4, 1), ((1, 530, 2, 72), (1, 530, 2, 72), (1, 530, 2, 72), (1, 12, 2, 72)), None),
    # fsdp 2 × context 4: self-attention on the whole (padded) sequence with 8/4 heads; cross-attention
    # on this device's quarter of the queries with all heads.
    "ulysses": ((1, 2, 1, 4), ((1, 532, 2, 72), (1, 532, 2, 72), (1, 133, 8, 72), (1, 12, 8, 72)), "all_to_all"),
    # ring: one K/V block of 133 tokens per step.
    "ring": ((1, 2, 1, 4), ((1, 133, 8, 72), (1, 133, 8, 72), (1, 133, 8, 72), (1, 12, 8, 72)), "collective_permute"),
}
KERNELS = {
    "splash": ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"),
    "cudnn": export.CUDNN_CALLS,
}


def _trainer(attention, mesh):
    return tr.Trainer(
        CONFIG,
        RuntimeOptions(attention=attention, compute_dtype=jnp.bfloat16, remat="full"),
        OptimConfig(learning_rate=1e-4, warmup_steps=0),
        ObjectiveConfig(i2v_prob=0.5, caption_dropout_prob=0.1),
        mesh,
    )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind,backend", [("tpu-v5p", "splash"), ("h100", "cudnn")])
def test_train_step_lowers_with_fused_kernels_in_every_attention(kind, backend, mode):
    mesh_shape, shapes, collective = MODES[mode]
    ici = dict(zip(("data", "fsdp", "tensor", "context"), mesh_shape))
    mesh = export.abstract_mesh(ici, kind) if backend == "splash" else make_mesh(mesh_shape)
    trainer = _trainer(backend if mode == "none" else f"{backend}+{mode}", mesh)
    exported, state, batch = export.export_step(trainer, tr.batch_shapes(CONFIG, LATENT, BATCH, TEXT_LEN), kind)
    text = exported.mlir_module()
    assert exported.platforms == (export.DEVICES[kind][2],)

    expected = export.expected_attention_shapes(trainer, BATCH, TOKENS, TEXT_LEN)
    assert (*expected["self"], *expected["cross"]) == shapes
    calls = export.kernel_calls(text)
    coverage = export.attention_coverage(calls, expected, backend)
    # Self- and cross-attention, forward and backward, each call the fused kernel on exactly its
    # per-device operands; no other kernel call is in the program.
    assert all(coverage.values()), coverage
    assert sum(coverage.values()) == len(calls), (coverage, calls)
    names = {c.name for c in calls}
    assert all(any(n.startswith(k) for n in names) for k in KERNELS[backend]), names
    # Per shard: the calls sit in shard_maps (manual computations); an unsplittable custom call in
    # the SPMD region would be gathered and computed whole.
    assert "sdy.manual_computation" in text or "SPMDFullToShardShape" in text
    if collective:
        assert collective in text
    assert export.check_shardings(exported, state, batch, mesh)
    assert export.residual_constraints(text, trainer, BATCH, TOKENS) > 0


def test_shipped_10b_layout_lowers_for_tpu_at_its_real_device_count():
    """`python -m mugv_jax.export --config=configs/mugv_10b.py:video_720` (README): the default
    stage on its default pod, v5p-256 = 128 chips, lowered for TPU over an abstract mesh of 128 TPU
    v5p devices on this CPU: a fused kernel in every attention, the planned shardings."""
    proc = run_module("mugv_jax.export", "--config=configs/mugv_10b.py:video_720", timeout=600)
    out = proc.stdout
    print(out)
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    c = mugv_10b.get_config("video_720")
    assert c.attention.startswith("splash") and c.target.devices == 128
    assert f"{c.attention} on 128 × tpu-v5p" in out and "bucket (14, 160, 90, 256)" in out
    for which in ("self", "cross"):
        for phase in ("fwd", "bwd"):
            line = next(line for line in out.splitlines() if f"{which}-attention {phase}:" in line)
            assert int(line.split(": ")[1].split()[0]) > 0 and "MISSING" not in line
    assert "splash_mha_fwd" in out and "splash_mha_dkv" in out
    assert "with the planned shardings: yes" in out and out.rstrip().endswith("complete")
