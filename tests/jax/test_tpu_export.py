"""The real train step lowers for TPU with the Pallas kernels in it, exported on the CPU.

`jax.export(..., platforms=["tpu"])` runs JAX's TPU lowering, Pallas' Mosaic lowering included,
without a TPU: a Pallas TPU kernel becomes a `tpu_custom_call` carrying the serialized Mosaic
kernel. Nothing runs and nothing is compiled for the chip (Mosaic's own compilation happens on the
TPU host), so these tests prove that the step traces and lowers with each backend, which kernels
it calls, that each kernel call runs per shard (inside a shard_map, on per-device shapes) and
that the step's inputs and outputs keep the shardings the trainer planned.

The model is small but has the release's head dim (72, padded to 128 lanes by splash), 8 heads,
a caption mask with padding and 14 tokens that context 4 pads to 16.
"""

from __future__ import annotations

import re
import unittest.mock as mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mugv.config import DiTConfig
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_jax.dit.model import RuntimeOptions
from mugv_jax.train import step as tr
from tests.trainer_helpers import make_mesh

CONFIG = DiTConfig(depth=2, hidden_size=576, num_heads=8, text_dim=32, max_text_tokens=16)
BATCH, TEXT_LEN = 2, 12
LATENT = (2, 4, 6)  # 2·2·3 video tokens + start/end = 14


def _abstract_batch(trainer):
    f, h, w = LATENT
    shapes = {
        "latents": ((BATCH, CONFIG.in_channels, f, h, w), jnp.float32),
        "y": ((BATCH, 1, TEXT_LEN, CONFIG.text_dim), jnp.float32),
        "mask": ((BATCH, TEXT_LEN), jnp.int32),
        "fps": ((BATCH,), jnp.float32),
    }
    arrays = {k: np.zeros(s, d) for k, (s, d) in shapes.items()}
    sh = trainer.batch_sharding(arrays)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sh[k]) for k, (s, d) in shapes.items()}


def export_train_step(attention: str, mesh_shape):
    """(exported step, the trainer, abstract state, abstract batch): the step as
    Trainer.train_step jits it, lowered for TPU."""
    trainer = tr.Trainer(
        CONFIG,
        RuntimeOptions(attention=attention, compute_dtype=jnp.bfloat16, remat="full"),
        OptimConfig(learning_rate=1e-4, warmup_steps=0),
        ObjectiveConfig(i2v_prob=0.5, caption_dropout_prob=0.1),
        make_mesh(mesh_shape),
    )
    state = trainer.abstract_state()
    batch = _abstract_batch(trainer)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = {k: v.sharding for k, v in batch.items()}
    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    step = jax.jit(
        trainer._step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=(0,)
    )
    # The kernels check the backend they trace for; the export targets a TPU.
    with mock.patch.object(jax, "default_backend", lambda: "tpu"):
        exported = jax.export.export(step, platforms=["tpu"])(state, batch)
    return exported, trainer, state, batch


def _kernel_calls(text):
    """[(kernel name, first bf16 operand type)] of every tpu_custom_call, e.g.
    ('splash_mha_fwd_segmented_residuals', '2x128x128')."""
    calls = []
    for line in text.splitlines():
        if "custom_call @tpu_custom_call(" not in line:
            continue
        name = re.search(r'name = "([^"]+)"', line)
        sig = line.rsplit(" : (", 1)[1].split(") -> ", 1)[0]
        qs = re.findall(r"tensor<([0-9x]+)xbf16>", sig)
        calls.append((name.group(1) if name else "?", qs[0] if qs else None))
    return calls


def _assert_planned_shardings(exported, state, batch, mesh):
    """The exported step's input and output shardings are the ones the trainer planned."""
    flat_in = jax.tree.leaves((state, batch))
    got_in = exported.in_shardings_jax(mesh)
    assert len(got_in) == len(flat_in)
    for got, leaf in zip(got_in, flat_in):
        assert got.is_equivalent_to(leaf.sharding, len(leaf.shape)), (leaf.shape, got, leaf.sharding)
    flat_state = jax.tree.leaves(state)
    for got, leaf in zip(exported.out_shardings_jax(mesh)[: len(flat_state)], flat_state):
        assert got.is_equivalent_to(leaf.sharding, len(leaf.shape)), (leaf.shape, got, leaf.sharding)
    # The plan really splits something (parameters over tensor/fsdp, the batch over data/fsdp).
    assert any(not s.is_fully_replicated for s in got_in)


# (attention, mesh (data, fsdp, tensor, context), leading dim of the kernels' query operand,
#  collective the scheme adds). The query operand is per device: splash takes [heads, seq, 128]
#  per sample; 8 heads and 2 samples in all.
CASES = [
    # tensor 4: 2 heads per device.
    ("splash", (2, 1, 4, 1), {"2"}, None),
    # self-attention after the all-to-all: 8/4 heads; cross-attention: all 8 heads, 1/4 of queries.
    ("splash+ulysses", (1, 2, 1, 4), {"2", "8"}, "all_to_all"),
    # self-attention: splash ring steps on one K/V block each; cross-attention per length shard.
    ("splash+ring", (1, 2, 1, 4), {"8"}, "collective_permute"),
]
KERNELS = {"splash": ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")}


@pytest.mark.parametrize("attention,mesh_shape,lead,collective", CASES)
def test_train_step_exports_for_tpu_with_kernels_per_shard(attention, mesh_shape, lead, collective):
    exported, trainer, state, batch = export_train_step(attention, mesh_shape)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    calls = _kernel_calls(text)
    backend = attention.split("+")[0]
    names = {name for name, _ in calls}
    # Forward and backward kernels.
    for kernel in KERNELS[backend]:
        assert any(n.startswith(kernel) for n in names), (kernel, names)
    assert all(n.startswith(KERNELS[backend]) for n in names), names
    # Per-device operands: the kernel calls sit in shard_maps (manual computations); an
    # unsplittable custom call in the SPMD region would be gathered and computed whole.
    assert "sdy.manual_computation" in text or "SPMDFullToShardShape" in text
    assert {q.split("x")[0] for _, q in calls} == lead, calls
    # splash pads head dim 72 to 128 lanes
    assert all(q.endswith("x128") and q.count("x") == 2 for _, q in calls), calls
    if collective:
        assert collective in text
    _assert_planned_shardings(exported, state, batch, trainer.mesh)
