"""The fused attention kernels accept the exact arguments our code builds (checked on the CPU).

cuDNN (JAX): `jax.nn.dot_product_attention(implementation="cudnn")` validates its arguments in
Python and its CUDA lowering is plain Python too, so with cuDNN's version probe answered the
whole train-time call (forward and backward) lowers for CUDA here; the test then reads which
cuDNN kernel and mask type the program asks for. A bias (what a boolean `mask` becomes) would
select the `ScaleBias` kernels; a [B,1,1,L] mask is rejected outright.

Transformer Engine (Megatron): TE cannot be installed here, so its documented constraints are
restated below, from the TE source (NVIDIA/TransformerEngine, transformer_engine/pytorch/
attention/dot_product_attention/): `utils.get_attention_backend` ("Filter: Attention mask":
an "arbitrary" mask disables FlashAttention and FusedAttention, leaving the unfused backend that
materialises the [b, h, sq, skv] scores; "padding" takes one [b, 1, 1, sq] tensor for
self-attention and a ([b, 1, 1, sq], [b, 1, 1, skv]) pair for cross-attention; "Filter: Head
dimension": FlashAttention-2 wants head_dim % 8 == 0 and <= 256), `utils.get_cu_seqlens` (the
sequence length is the count of unmasked positions, so the valid tokens must come first) and
`DotProductAttention.forward` (boolean masks, True = masked out; q/k/v of one dtype). megatron.core
0.16.1's TEDotProductAttention.forward passes `attention_mask` and `attn_mask_type` through
unchanged (megatron/core/extensions/transformer_engine.py).
"""

from __future__ import annotations

import json
import re
import unittest.mock as mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mugv_jax.parallel import attention
from mugv_jax.parallel import context_parallel as cp

# A cuDNN version for the probe that needs a GPU (9.8: padding masks, head dim 72, Hopper).
CUDNN_VERSION = 90800
CUDNN_KERNELS = {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}


@pytest.fixture
def pretend_cuda():
    """Trace as a process on an NVIDIA GPU would: JAX reports the gpu backend and cuDNN's
    version probe answers (nothing runs: the program is only lowered)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    with (
        mock.patch.object(jax, "default_backend", lambda: "gpu"),
        mock.patch.object(fa, "check_cudnn_version", lambda: CUDNN_VERSION),
    ):
        yield


def _export_for_cuda(fn, *args):
    """StableHLO text of value_and_grad(fn) lowered for CUDA, cuDNN custom calls allowed."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in CUDNN_KERNELS]
    grad = jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
    return jax.export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()


def _custom_calls(text):
    """[(target, backend_config dict)] of every stablehlo.custom_call in a module."""
    out = []
    for line in text.splitlines():
        m = re.search(r"custom_call @([\w$]+)\(", line)
        if not m:
            continue
        cfg = re.search(r'backend_config = "(.*?)"(?:,| :|\})', line)
        config = {}
        if cfg and cfg.group(1).startswith("{"):
            config = json.loads(cfg.group(1).replace("\\22", '"'))
        out.append((m.group(1), config))
    return out


def _qkv(b=2, nq=30, nk=12, h=4, d=72, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (
        jax.random.normal(ks[0], (b, nq, h, d)).astype(dtype),
        jax.random.normal(ks[1], (b, nk, h, d)).astype(dtype),
        jax.random.normal(ks[2], (b, nk, h, d)).astype(dtype),
    )


def _assert_cudnn_padding_kernels(text):
    calls = [(t, c) for t, c in _custom_calls(text) if t.startswith("__cudnn")]
    assert {t for t, _ in calls} == CUDNN_KERNELS, [t for t, _ in calls]
    for target, config in calls:
        fmha = config["cudnn_fmha_backend_config"]
        assert fmha["mask_type"] == "PADDING", (target, fmha["mask_type"])
        assert fmha["is_flash_attention"] is True
        assert fmha["fmha_scale"] == pytest.approx(72**-0.5)


def test_cudnn_cross_attention_lowers_to_the_padding_kernel(pretend_cuda):
    """Text keys with a caption mask (the model never passes None): prefix masks as in the data,
    and a ragged one, which must work too."""
    q, k, v = _qkv()
    for mask in (
        jnp.arange(12)[None] < jnp.array([[5], [12]]),
        jnp.stack([jnp.arange(12) % 3 != 1, jnp.arange(12) < 7]),
    ):
        text = _export_for_cuda(
            lambda q, k, v: attention.dot_product_attention(q, k, v, key_mask=mask, implementation="cudnn"), q, k, v
        )
        _assert_cudnn_padding_kernels(text)


def test_cudnn_padded_self_attention_lowers_to_the_padding_kernel(pretend_cuda):
    """Self-attention over a sequence padded to the context degree (the model's padding mask)."""
    q, k, v = _qkv(nq=16, nk=16)
    mask = jnp.broadcast_to(jnp.arange(16) < 14, (2, 16))
    text = _export_for_cuda(lambda q, k, v: cp.self_attention(q, k, v, key_mask=mask, implementation="cudnn"), q, k, v)
    _assert_cudnn_padding_kernels(text)


# --- Megatron / Transformer Engine -----------------------------------------------------------

TE_MASK_TYPES = {
    "no_mask",
    "padding",
    "causal",
    "padding_causal",
    "causal_bottom_right",
    "padding_causal_bottom_right",
    "arbitrary",
}


def _is_prefix_padding(mask: torch.Tensor) -> bool:
    """[b, 1, 1, s] with True = padding: every row is False… then True… (valid tokens first)."""
    valid = (~mask).reshape(mask.shape[0], -1).int()
    return bool(torch.equal(valid.cummin(dim=1).values, valid))


def check_te_core_attention_call(q, k, v, attention_mask, attn_mask_type, attention_type):
    """Raise AssertionError where TE would refuse the call or fall back to unfused attention.

    q/k/v in megatron's sbhd layout [s, b, h, d]."""
    name = attn_mask_type.name
    assert name in TE_MASK_TYPES, name
    assert name != "arbitrary", "an arbitrary mask disables TE's flash and fused attention"
    assert q.dtype == k.dtype == v.dtype
    d = q.shape[-1]
    assert d % 8 == 0 and d <= 256, d
    sq, b = q.shape[:2]
    skv = k.shape[0]
    assert k.shape[1] == b and v.shape[:2] == k.shape[:2]
    if "padding" not in name:
        assert attention_mask is None, f"{name} takes no attention_mask"
        return
    if attention_type == "self":
        assert isinstance(attention_mask, torch.Tensor) and sq == skv
        masks = [(attention_mask, sq)]
    else:
        assert isinstance(attention_mask, (tuple, list)) and len(attention_mask) == 2, (
            "cross-attention padding takes a (q_mask, kv_mask) pair"
        )
        masks = [(attention_mask[0], sq), (attention_mask[1], skv)]
    for mask, s in masks:
        assert mask.dtype == torch.bool, mask.dtype
        assert tuple(mask.shape) == (b, 1, 1, s), (tuple(mask.shape), (b, 1, 1, s))
        assert _is_prefix_padding(mask), "TE counts the unmasked positions: valid tokens first"


class _Recorder(torch.nn.Module):
    """Wraps a core attention and records each call's arguments."""

    def __init__(self, inner, log):
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, q, k, v, attention_mask, attn_mask_type=None, **kwargs):
        self.log.append(
            dict(
                q=q,
                k=k,
                v=v,
                attention_mask=attention_mask,
                attn_mask_type=attn_mask_type,
                attention_type=self.inner.attention_type,
            )
        )
        return self.inner(q, k, v, attention_mask, attn_mask_type=attn_mask_type, **kwargs)


@pytest.fixture(scope="module")
def megatron_model():
    from mugv_megatron.model import build as dit
    from tests.helpers import DIT_WEIGHTS

    return dit.load(DIT_WEIGHTS, "tiny")


def _record_core_attention(model):
    log = []
    for layer in model.decoder.layers:
        for attn in (layer.self_attention, layer.cross_attention):
            if not isinstance(attn.core_attention, _Recorder):
                attn.core_attention = _Recorder(attn.core_attention, log)
            attn.core_attention.log = log
    return log


def test_megatron_forward_passes_te_acceptable_masks(megatron_model):
    """Every core-attention call of a real forward (text padding in sample 0 of t2v)."""
    from tests.helpers import case_inputs

    log = _record_core_attention(megatron_model)
    args, kwargs = case_inputs("t2v")
    with torch.no_grad():
        megatron_model(*(torch.as_tensor(a) for a in args), **{k: torch.as_tensor(v) for k, v in kwargs.items()})
    assert len(log) == 2 * megatron_model.dit_config.depth
    kinds = set()
    for call in log:
        check_te_core_attention_call(
            call["q"], call["k"], call["v"], call["attention_mask"], call["attn_mask_type"], call["attention_type"]
        )
        kinds.add(call["attn_mask_type"].name)
    assert "padding" in kinds  # the caption mask really reached the kernel as padding


def test_megatron_padded_self_attention_is_a_fused_padding_call(megatron_model):
    """Self-attention over a sequence padded for SP/CP (the model's own padding mask): TE-shaped
    arguments, and the valid queries see exactly the unpadded attention."""
    from mugv_megatron.model.attention import trailing_padding

    log = _record_core_attention(megatron_model)
    attn = megatron_model.decoder.layers[0].self_attention
    c, d = megatron_model.dit_config.hidden_size, megatron_model.dit_config.head_dim
    b, length, padded = 2, 13, 16
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(padded, b, c, generator=gen)
    hidden[length:] = 0.0  # the model pads with zero tokens
    angles = torch.rand(padded, b, 1, d, generator=gen) * 6.0
    cos, sin = angles.cos(), angles.sin()
    key_padding = trailing_padding(b, padded, length)
    with torch.no_grad():
        out, _ = attn(hidden, cos, sin, key_padding)
        ref, _ = attn(hidden[:length], cos[:length], sin[:length], None)
    assert [call["attn_mask_type"].name for call in log] == ["padding", "no_mask"]
    for call in log:
        check_te_core_attention_call(
            call["q"], call["k"], call["v"], call["attention_mask"], call["attn_mask_type"], call["attention_type"]
        )
    q_mask, kv_mask = log[0]["attention_mask"]
    assert not q_mask.any() and kv_mask[:, 0, 0].sum(dim=1).tolist() == [padded - length] * b
    # float32, different key counts in the reductions only.
    torch.testing.assert_close(out[:length], ref, rtol=1e-5, atol=1e-6)


def test_megatron_reorders_a_ragged_caption_without_changing_the_output(megatron_model):
    """A caption mask that is not valid-first (nothing in the data writes one, nothing forbids
    it) reaches the kernel as a valid-first padding mask, with the same result."""
    from tests.helpers import case_inputs

    args, kwargs = case_inputs("t2v")
    args = [torch.as_tensor(a) for a in args]
    kwargs = {k: torch.as_tensor(v) for k, v in kwargs.items()}
    with torch.no_grad():
        want = megatron_model(*args, **kwargs)
    # Sample 0 has 5 valid tokens of 12: spread them out (text tokens are a set to the model).
    perm = torch.tensor([5, 0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 11])
    y, mask = args[2].clone(), kwargs["mask"].clone()
    y[0, 0] = y[0, 0, perm]
    mask[0] = mask[0, perm]
    assert mask[0].tolist() != sorted(mask[0].tolist(), reverse=True)
    log = _record_core_attention(megatron_model)
    with torch.no_grad():
        got = megatron_model(args[0], args[1], y, **{**kwargs, "mask": mask})
    for call in log:
        check_te_core_attention_call(
            call["q"], call["k"], call["v"], call["attention_mask"], call["attn_mask_type"], call["attention_type"]
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_megatron_sdpa_core_attention_reproduces_the_golden_vectors():
    """The torch-SDPA local spec (the GPU path without TE) against the golden outputs."""
    from mugv.config import get_config
    from mugv_megatron.model import build as dit
    from mugv_megatron.model.dit import MUGDiT
    from mugv_megatron.model.spec import get_local_layer_spec
    from mugv_megatron.model.transformer_config import make_transformer_config
    from mugv_megatron.parallel import state as parallel
    from tests.helpers import DIT_WEIGHTS, case_inputs, dit_vectors

    config = get_config("tiny")
    if not parallel.is_initialized():
        parallel.setup(1)
    model = MUGDiT(config, make_transformer_config(config, perform_initialization=False), get_local_layer_spec("sdpa"))
    dit.load_release_state(model, dit.read_release_checkpoint(DIT_WEIGHTS))
    model.eval()
    for case in ("t2v", "i2v"):
        args, kwargs = case_inputs(case)
        with torch.no_grad():
            out = model(*(torch.as_tensor(a) for a in args), **{k: torch.as_tensor(v) for k, v in kwargs.items()})
        # docs/reference.md §9: float32 agreement within 1e-4.
        assert (out - torch.as_tensor(dit_vectors()[f"{case}.out"])).abs().max().item() <= 1e-4


def test_cudnn_arguments_compute_the_masked_attention():
    """The lengths (and key reordering) handed to cuDNN mean the same attention as the mask: run
    them through jax.nn.dot_product_attention's XLA path, which honours the same arguments."""
    q, k, v = _qkv(dtype=jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    ragged = jnp.stack([jnp.arange(12) % 3 != 1, jnp.zeros(12, bool)])  # sample 1: no key
    q_, k_, v_, kw = attention.cudnn_arguments(q, k, v, ragged)
    assert set(kw) == {"key_value_seq_lengths"} and kw["key_value_seq_lengths"].tolist() == [8, 1]
    with jax.default_matmul_precision("highest"):
        got = jax.nn.dot_product_attention(q_, k_, v_, implementation="xla", **kw)
    want = attention.dot_product_attention(q, k, v, key_mask=ragged, precision=hi)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)

    qs, ks, vs = _qkv(nq=16, nk=16, dtype=jnp.float32)
    pad = jnp.broadcast_to(jnp.arange(16) < 14, (2, 16))
    q_, k_, v_, kw = attention.cudnn_arguments(qs, ks, vs, pad, key_mask_prefix=True, pad_queries=True)
    assert q_ is qs and k_ is ks and set(kw) == {"query_seq_lengths", "key_value_seq_lengths"}
    with jax.default_matmul_precision("highest"):
        got = jax.nn.dot_product_attention(q_, k_, v_, implementation="xla", **kw)
    want = cp.self_attention(qs, ks, vs, key_mask=pad, precision=hi)
    np.testing.assert_allclose(got[:, :14], want[:, :14], rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(want[:, 14:]))  # padded query rows are zero


def test_kernel_backends_run_per_shard_under_a_mesh():
    """Under a mesh the Pallas kernel runs inside a shard_map over batch and heads (a custom call
    the partitioner cannot split) and equals the XLA reference, padded queries zeroed."""
    from mugv_jax.parallel import sharding
    from tests.trainer_helpers import make_mesh

    q, k, v = _qkv(b=2, nq=16, nk=16, h=4, dtype=jnp.float32)
    pad = jnp.broadcast_to(jnp.arange(16) < 14, (2, 16))
    mesh = make_mesh((2, 1, 4, 1))
    hi = jax.lax.Precision.HIGHEST
    with sharding.activation_sharding(mesh):
        fn = lambda q, k, v: cp.self_attention(q, k, v, key_mask=pad, implementation="pallas", precision=hi)
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
        got = jax.jit(fn)(q, k, v)
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    want = cp.self_attention(q, k, v, key_mask=pad, precision=hi)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got[:, 14:]))


# --- every shipped config ---------------------------------------------------------------------


def _shipped_configs():
    """(label, config) for every configs/*.py training config and each of its stages/arguments."""
    import importlib
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "configs"))
    out = []
    for path in sorted((root / "configs").glob("*.py")):
        module = importlib.import_module(f"configs.{path.stem}")
        if not hasattr(module, "get_config") or path.stem in ("mcore",):
            continue
        args = list(getattr(module, "STAGES", {})) or {"tiny": [None, "i2v"], "main": ["quick", "full"]}.get(
            path.stem, [None]
        )
        for arg in args:
            config = module.get_config(arg) if arg is not None else module.get_config()
            if "attention" in config:  # the VAE configs have no DiT
                out.append((f"{path.stem}:{arg or ''}", config))
    return out


def _launch_attention_overrides():
    """Attention backends the launch scripts set on top of a config (--config.attention=X)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "launch"
    found = set()
    for path in root.iterdir():
        found.update(re.findall(r"--config\.attention=([\w+]+)", path.read_text()))
    return found


def test_no_shipped_config_selects_an_arbitrary_mask(pretend_cuda):
    """Every config, stage and bucket, with the launch scripts' overrides, on both trainers:
    JAX's cuDNN path passes JAX's checks (no bias) and Megatron's core attention gets TE
    padding masks for every TP/SP/CP layout the launch scripts can set."""
    import pathlib

    from mugv import geometry
    from mugv.run.config import model_config_from
    from mugv_jax.dit.model import RuntimeOptions
    from mugv_megatron.model.attention import CORE_ATTENTION_TYPE, padding_mask_arguments, trailing_padding
    from mugv_megatron.model.dit import padded_length

    configs = _shipped_configs()
    assert {"mugv_10b:video_720", "tiny:", "tiny_curriculum:sft"} <= {n for n, _ in configs}
    overrides = _launch_attention_overrides()
    assert "cudnn" in overrides  # launch/jax_gpu_slurm.sbatch
    checked_cudnn = 0
    for _name, c in configs:
        model = model_config_from(c)
        h, d = model.num_heads, model.head_dim
        backends = {c.attention} | (overrides if c.compute_dtype == "bfloat16" else set())
        buckets = {(f, hh, ww) for f, hh, ww, _ in c.data.buckets}
        text_len = c.data.text_len
        for attention_name in backends:
            opts = RuntimeOptions(attention=attention_name, compute_dtype=c.compute_dtype)
            if opts.attention != "cudnn":
                continue
            for latent in buckets:
                n = geometry.num_tokens(latent, model)
                q = jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16)
                kt = jax.ShapeDtypeStruct((1, text_len, h, d), jnp.bfloat16)
                text_mask = jnp.arange(text_len)[None] < max(1, text_len // 2)
                jax.eval_shape(
                    lambda q, k: attention.dot_product_attention(q, k, k, key_mask=text_mask, implementation="cudnn"),
                    q,
                    kt,
                )
                jax.eval_shape(
                    lambda q: cp.self_attention(q, q, q, key_mask=jnp.ones((1, n), bool), implementation="cudnn"), q
                )
                checked_cudnn += 1
        # Megatron: every layout megatron_torchrun.sh / megatron_slurm.sbatch can set.
        for tp in (t for t in (1, 2, 4, 8) if h % t == 0):
            for sp in (False, True) if tp > 1 else (False,):
                for cp_size in (1, 2, 4):
                    for latent in buckets:
                        length = geometry.num_tokens(latent, model)
                        padded = padded_length(length, tp=tp, sp=sp, cp=cp_size)
                        q = torch.empty(padded // cp_size, 1, h // tp, d, device="meta")
                        k = torch.empty(padded, 1, h // tp, d, device="meta")
                        kt = torch.empty(text_len, 1, h // tp, d, device="meta")
                        self_pad = trailing_padding(1, padded, length)
                        text_pad = (torch.arange(text_len) >= max(1, text_len // 2)).view(1, 1, 1, -1)
                        for kv, pad in ((k, self_pad), (kt, text_pad)):
                            mask, kind = padding_mask_arguments(q.shape[0], pad)
                            check_te_core_attention_call(q, kv, kv, mask, kind, CORE_ATTENTION_TYPE)
    assert checked_cudnn > 0
    # And nothing in the Megatron code names the arbitrary mask type.
    src = pathlib.Path(__file__).resolve().parents[2] / "mugv_megatron"
    assert not [p.name for p in src.glob("*.py") if "AttnMaskType.arbitrary" in p.read_text()]
