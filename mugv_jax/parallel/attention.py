"""Scaled dot-product attention behind one function, so backends can be swapped by name.

Backends (RuntimeOptions.attention):
- "xla":     einsum + softmax; the reference, runs everywhere, materialises the scores.
- "chunked": blockwise online softmax in plain XLA with a custom backward that keeps only the
             output and the log-sum-exp (mugv_jax/parallel/blockwise.py): a fused kernel's
             memory profile anywhere; the planner compiles it in place of splash and cuDNN.
- "cudnn":   cuDNN's fused flash attention (NVIDIA GPU, bf16/fp16).
- "splash":  the TPU Pallas splash-attention kernels (forward, dq and dkv fused kernels).
Head dim 72 (the release's): the TPU kernels want the head dim on the 128-lane axis, so "splash"
zero-pads q/k/v to 128 (exact: zero columns add nothing to q·kᵀ and come out as zero output
columns that are cut off; the softmax scale uses the true head dim). cuDNN takes 72 directly.
`mugv.roofline.hardware_factor` gives each kernel's work on its platform relative to the model's.

Masks. Every backend takes a per-key validity mask, and the fused kernels get it in their own
form, never as a dense bias: cuDNN as per-sample sequence lengths (`cudnn_arguments`), splash as
segment ids. `key_mask_prefix` says valid keys come first (padding); `pad_queries` says q and k
are one padded sequence (self-attention), whose padded query rows come out zero.

Ring steps. Each kernel backend also has a ring step (`ring_step`): a forward that returns the
output and the log-sum-exp of its block of keys, and a backward that takes the output and
log-sum-exp of the whole ring, so ring blocks combine exactly (context_parallel.py).

Sharding. The kernel backends are custom calls (or, for "chunked", loops) that XLA's partitioner
must not split or gather, so under `sharding.activation_sharding` they run inside a `shard_map`
over the batch, head and (for queries) length axes; each device calls the kernel on its own
shard. Context parallelism (ring, Ulysses) wraps these in mugv_jax/parallel/context_parallel.py.

On the CPU, `stand_in("chunked")` makes "splash" and "cudnn" (and their ring steps) compute with
"chunked": the same shard_maps and collectives, the same O(N·d) residuals (mugv_jax/plan.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from mugv import roofline
from mugv_jax.parallel import blockwise, sharding, xla_attention

_state = threading.local()  # stand_in, lowering_for


def _xla_attention(q, k, v, key_mask, precision, **_):
    # A sample with no valid key attends to nothing: zero output instead of NaN.
    return xla_attention.attention(q, k, v, None if key_mask is None else key_mask.astype(bool), precision)


def _full_mask(k, key_mask):
    return jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask.astype(bool)


def _chunked_attention(q, k, v, key_mask, precision, residual_name=None, **_):
    return blockwise.attention(q, k, v, _full_mask(k, key_mask), precision, blockwise.BLOCK, residual_name)


def _zero_if_no_key(out, key_mask):
    if key_mask is None:
        return out
    return jnp.where(jnp.any(key_mask, axis=-1)[:, None, None, None], out, jnp.zeros_like(out))


def _round_up(x, m):
    return -(-x // m) * m


def platform() -> str:
    """The platform being traced for ("cpu", "gpu", "tpu"): the one `lowering_for` names, else the
    device of an enclosing abstract mesh, else JAX's backend."""
    named = getattr(_state, "platform", None)
    if named:
        return named
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


@contextlib.contextmanager
def lowering_for(name: str):
    """Trace the kernels for platform `name` on this machine (mugv_jax/export.py lowers for a pod)."""
    prev = getattr(_state, "platform", None)
    _state.platform = name
    try:
        yield
    finally:
        _state.platform = prev


# --- cuDNN ---------------------------------------------------------------------------------------


def cudnn_arguments(q, k, v, key_mask, *, key_mask_prefix: bool = False, pad_queries: bool = False):
    """(q, k, v, keyword arguments) of `jax.nn.dot_product_attention` for cuDNN's padding kernels.

    The mask becomes per-sample lengths (mask type PADDING, no bias): `key_value_seq_lengths` is
    the count of valid keys, and with `pad_queries` `query_seq_lengths` the same count. A key mask
    that is not known to be a prefix (a caption mask, which the data pipeline writes as a prefix
    but nothing enforces) has its keys and values reordered valid-first, stably: attention does not
    depend on the order of the keys, and the text is short. A sample without any valid key gets
    length 1 (cuDNN is never handed an empty sequence); the caller zeroes its output.
    """
    if key_mask is None:
        return q, k, v, {}
    key_mask = key_mask.astype(bool)
    lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
    if pad_queries:
        if not key_mask_prefix or q.shape[1] != k.shape[1]:
            raise ValueError("pad_queries needs a prefix key mask over the queries' own sequence")
        return q, k, v, dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    if not key_mask_prefix:
        order = jnp.argsort(jnp.logical_not(key_mask).astype(jnp.int8), axis=-1, stable=True)
        take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
        k, v = take(k), take(v)
    return q, k, v, dict(key_value_seq_lengths=jnp.maximum(lengths, 1))


def _check_cudnn(q):
    if platform() != "gpu":
        raise RuntimeError(
            f"attention='cudnn' needs an NVIDIA GPU, but the JAX backend is "
            f"{platform()!r}; use attention='xla' or 'chunked' (or 'splash' on TPU)"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention='cudnn' runs in bfloat16/float16, got {q.dtype}; set "
            f"compute_dtype='bfloat16' or use attention='xla'"
        )


def _even(x, axis=1):
    """Pad a sequence axis to an even length: jax's cuDNN path refuses odd training lengths (it
    passes a placeholder bias, and biased kernels need even lengths). The extra query row is cut;
    the extra key lies beyond every sequence length, so cuDNN masks it."""
    if x.shape[axis] % 2 == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, 1)
    return jnp.pad(x, pad)


def _cudnn_attention(q, k, v, key_mask, precision, key_mask_prefix=False, pad_queries=False, **_):
    _check_cudnn(q)
    nq = q.shape[1]
    q, k, v, kwargs = cudnn_arguments(q, k, v, key_mask, key_mask_prefix=key_mask_prefix, pad_queries=pad_queries)
    if key_mask is None and k.shape[1] % 2:
        kwargs["key_value_seq_lengths"] = jnp.full(k.shape[:1], k.shape[1], jnp.int32)
    out = jax.nn.dot_product_attention(_even(q), _even(k), _even(v), implementation="cudnn", **kwargs)
    return _zero_if_no_key(out[:, :nq], key_mask)


def _cudnn_call(q, k, key_mask):
    """Arguments shared by the cuDNN ring step's forward and backward primitives: jax's own
    `cudnn_dot_product_attention` builds the same ones, but its public form returns the
    log-sum-exp in bfloat16 and drops its cotangent, so the ring calls the primitives."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    _check_cudnn(q)
    lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
    q_len = jnp.full(lengths.shape, q.shape[1], jnp.int32)  # every query row (the ring zeroes padding)
    unused = jnp.zeros(0, q.dtype)
    fa.check_cudnn_version()
    params = dict(
        scale=q.shape[-1] ** -0.5,
        seed=42,
        dropout_rate=0.0,
        variadic_args=(False, False),  # no bias, no dbias
        mask_type=fa.MaskType.PADDING,
        layout=fa.AttentionLayout.BTNH.value,
        sliding_window_length=None,
    )
    args = (unused, q_len, jnp.maximum(lengths, 1), unused, unused, unused, unused)
    return fa, params, args, lengths


def _cudnn_ring_fwd(q, k, v, key_mask, precision):
    nq = q.shape[1]
    fa, params, (bias, q_len, kv_len, *offsets), lengths = _cudnn_call(q, k, key_mask)
    out, lse = fa._dot_product_attention_fwd_p_wrapper.bind(
        _even(q), _even(k), _even(v), bias, q_len, kv_len, *offsets, **params, is_training=True
    )[:2]
    empty = (lengths == 0)[:, None, None]  # a block of padding only: contributes nothing
    # cuDNN's softmax statistics are [B, H, Nq]: the log-sum-exp of the scaled scores.
    lse = jnp.where(empty, -jnp.inf, lse[:, :, :nq].astype(jnp.float32))
    return jnp.where(empty[..., None], 0, out[:, :nq]), lse


def _cudnn_ring_bwd(q, k, v, key_mask, out, lse, dout, precision):
    nq, nk = q.shape[1], k.shape[1]
    fa, params, (bias, q_len, kv_len, *offsets), lengths = _cudnn_call(q, k, key_mask)
    lse = _even(jnp.where(jnp.isfinite(lse), lse, 0.0), axis=2)
    # A query with no valid key anywhere does not occur (the ring's blocks hold the real tokens).
    grads = fa._dot_product_attention_bwd_p_wrapper.bind(
        _even(q),
        _even(k),
        _even(v),
        bias,
        q_len,
        kv_len,
        *offsets,
        lse,
        _even(out.astype(q.dtype)),
        _even(dout.astype(q.dtype)),
        **params,
    )
    empty = (lengths == 0)[:, None, None, None]
    dq, dk, dv = grads[0][:, :nq], grads[1][:, :nk], grads[2][:, :nk]
    return tuple(jnp.where(empty, 0, g) for g in (dq, dk, dv))


# --- TPU splash attention ------------------------------------------------------------------------

SPLASH_LANES = roofline.TPU_LANES  # the head dim is padded up to a multiple of the lane width


def _splash_block(nq, nk):
    return 512 if min(nq, nk) >= 512 else 128


def kernel_operands(implementation: str, q_shape, k_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the q and k operands a backend's kernel call receives for [b, n, h, d] inputs:
    splash takes one sample's [heads, length, 128], lengths padded to its block; cuDNN
    [b, n, h, d] with the lengths made even (`_even`)."""
    if implementation == "cudnn":
        even = lambda s: (s[0], _round_up(s[1], 2), *s[2:])
        return even(tuple(q_shape)), even(tuple(k_shape))
    if implementation != "splash":
        return tuple(q_shape), tuple(k_shape)
    _, nq, h, d = q_shape
    nk = k_shape[1]
    blk, d_p = _splash_block(nq, nk), _round_up(d, SPLASH_LANES)
    return (h, _round_up(nq, blk), d_p), (h, _round_up(nk, blk), d_p)


def _splash_kernel(nq_p, nk_p, heads, blk, interpret, residual_name=None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    sizes = sk.BlockSizes(
        block_q=blk,
        block_kv=blk,
        block_kv_compute=blk,
        block_q_dkv=blk,
        block_kv_dkv=blk,
        block_kv_dkv_compute=blk,
        block_q_dq=blk,
        block_kv_dq=blk,
    )
    mask = sm.MultiHeadMask([sm.FullMask((nq_p, nk_p))] * heads)
    return sk.make_splash_mha(
        mask,
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
        residual_checkpoint_name=residual_name,
    )


@dataclasses.dataclass(frozen=True)
class _SplashCall:
    """q/k/v laid out for the splash kernels: scaled, heads first, head dim and lengths padded."""

    q: jax.Array  # [B, H, Nq_p, 128]
    k: jax.Array
    v: jax.Array
    q_ids: jax.Array  # [B, Nq_p] segment ids: 0 everywhere
    kv_ids: jax.Array  # [B, Nk_p]: 0 valid, 1 masked or padding
    kernel: object
    nq: int
    d: int


def _splash_prepare(q, k, v, key_mask, interpret, residual_name=None):
    if platform() != "tpu" and not interpret:
        raise RuntimeError(
            f"attention='splash' needs a TPU, but the JAX backend is {platform()!r}; use attention='xla' or 'chunked'"
        )
    b, nq, h, d = q.shape
    nk = k.shape[1]
    (_, nq_p, d_p), (_, nk_p, _) = kernel_operands("splash", q.shape, k.shape)
    blk = _splash_block(nq, nk)
    # Scale before padding with the true head dim: the kernel itself does not scale.
    qs = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    prep = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, d_p - d))).transpose(0, 2, 1, 3)
    kv_ids = jnp.where(jnp.pad(_full_mask(k, key_mask), ((0, 0), (0, nk_p - nk))), 0, 1).astype(jnp.int32)
    return _SplashCall(
        prep(qs, nq_p),
        prep(k, nk_p),
        prep(v, nk_p),
        jnp.zeros((b, nq_p), jnp.int32),
        kv_ids,
        _splash_kernel(nq_p, nk_p, h, blk, interpret, residual_name),
        nq,
        d,
    )


def _splash_out(c: _SplashCall, x, dtype):
    """[B, H, Nq_p, 128] → [B, Nq, H, D]."""
    return x.transpose(0, 2, 1, 3)[:, : c.nq, :, : c.d].astype(dtype)


def _splash_attention(q, k, v, key_mask, precision, interpret: bool = False, residual_name=None, **_):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    c = _splash_prepare(q, k, v, key_mask, interpret, residual_name)
    out = jax.vmap(lambda q_, k_, v_, qi, ki: c.kernel(q_, k_, v_, segment_ids=sk.SegmentIds(qi, ki)))(
        c.q, c.k, c.v, c.q_ids, c.kv_ids
    )
    return _zero_if_no_key(_splash_out(c, out, q.dtype), key_mask)


def _splash_ring_fwd(q, k, v, key_mask, precision, interpret: bool = False):
    # The packaged kernel's own entry points: its forward with the log-sum-exp kept, its backward
    # from given residuals (jax.experimental.pallas.ops.tpu.splash_attention, jax 0.10.2).
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    c = _splash_prepare(q, k, v, key_mask, interpret)
    kw = c.kernel.kwargs

    def one(q_, k_, v_, qi, ki):
        out, (lse,) = sk._splash_attention_forward(
            c.kernel.fwd_mask_info,
            q_,
            k_,
            v_,
            sk.SegmentIds(qi, ki),
            None,
            mask_value=kw["mask_value"],
            is_mqa=False,
            block_sizes=kw["block_sizes"],
            residual_checkpoint_name=None,
            save_residuals=True,
            mask_function=kw["mask_function"],
            interpret=kw["interpret"],
        )
        return out, lse

    out, lse = jax.vmap(one)(c.q, c.k, c.v, c.q_ids, c.kv_ids)
    # A query whose keys in this block are all masked gets lse ≈ mask value (-0.7·f32 max) from the
    # kernel: its weight in the ring's combination underflows to 0.
    return _splash_out(c, out, q.dtype), lse[:, :, : c.nq].astype(jnp.float32)


def _splash_ring_bwd(q, k, v, key_mask, out, lse, dout, precision, interpret: bool = False):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    c = _splash_prepare(q, k, v, key_mask, interpret)
    kw = c.kernel.kwargs
    nq_p, d_p = c.q.shape[2], c.q.shape[3]
    prep = lambda x: jnp.pad(x, ((0, 0), (0, nq_p - x.shape[1]), (0, 0), (0, d_p - c.d))).transpose(0, 2, 1, 3)
    lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, nq_p - c.nq)))

    def one(q_, k_, v_, qi, ki, o_, l_, do_):
        res = (q_, k_, v_, sk.SegmentIds(qi, ki), None, o_, l_, c.kernel.dq_mask_info, c.kernel.dkv_mask_info)
        grads = sk._splash_attention_bwd(
            False,
            kw["mask_value"],
            False,
            kw["block_sizes"],
            None,
            kw["mask_function"],
            None,
            kw["interpret"],
            res,
            do_,
        )
        return grads[3:6]

    dq, dk, dv = jax.vmap(one)(
        c.q, c.k, c.v, c.q_ids, c.kv_ids, prep(out.astype(q.dtype)), lse_p, prep(dout.astype(q.dtype))
    )
    nk = k.shape[1]
    cut = lambda x, n, dt: x.transpose(0, 2, 1, 3)[:, :n, :, : c.d].astype(dt)
    # dq is with respect to the pre-scaled queries.
    return (
        (cut(dq, c.nq, jnp.float32) * c.d**-0.5).astype(q.dtype),
        cut(dk, nk, k.dtype),
        cut(dv, nk, v.dtype),
    )


# --- the tables ----------------------------------------------------------------------------------

BACKENDS: dict[str, Callable] = {
    "xla": _xla_attention,
    "chunked": _chunked_attention,
    "cudnn": _cudnn_attention,
    "splash": _splash_attention,
}
# Backends XLA's SPMD partitioner must not split (custom calls; the chunked loop stands in for
# them): run per shard under a mesh.
KERNEL_BACKENDS = ("chunked", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class RingStep:
    """One block of a ring: `forward(q, k, v, key_mask, precision) → (out, lse [B, H, Nq])` and
    `backward(q, k, v, key_mask, out, lse, dout, precision) → (dq, dk, dv)`, where out/lse are the
    whole ring's."""

    forward: Callable
    backward: Callable


def _chunked_ring(block):
    return RingStep(
        lambda q, k, v, m, p: blockwise.forward(q, k, v, m, precision=p, block=block),
        lambda q, k, v, m, o, lse, do, p: blockwise.backward(q, k, v, m, o, lse, do, precision=p, block=block),
    )


RING_STEPS: dict[str, RingStep] = {
    # XLA's ring steps are the blockwise kernel too: a whole K/V block's scores per step (and
    # three of them in its backward) would hold [b, h, N/c, N/c] float32 several times over.
    "xla": _chunked_ring(blockwise.BLOCK),
    "chunked": _chunked_ring(blockwise.BLOCK),
    "cudnn": RingStep(_cudnn_ring_fwd, _cudnn_ring_bwd),
    "splash": RingStep(_splash_ring_fwd, _splash_ring_bwd),
}


@contextlib.contextmanager
def stand_in(implementation: str = "chunked", *, interpret_splash: bool = False):
    """Within this context the fused kernels that cannot run here compute with `implementation`
    (ring steps included); with `interpret_splash`, splash runs in Pallas interpret mode instead."""
    prev = getattr(_state, "stand_in", None)
    _state.stand_in = (implementation, interpret_splash)
    try:
        yield
    finally:
        _state.stand_in = prev


def _resolve(implementation: str) -> tuple[str, dict]:
    if implementation not in BACKENDS:
        raise ValueError(f"unknown attention implementation {implementation!r}; available: {sorted(BACKENDS)}")
    sub = getattr(_state, "stand_in", None)
    if sub is None or implementation not in ("cudnn", "splash"):
        return implementation, {}
    name, interpret_splash = sub
    if implementation == "splash" and interpret_splash:
        return "splash", {"interpret": True}
    return name, {}


def ring_step(implementation: str) -> RingStep:
    name, extra = _resolve(implementation)
    step = RING_STEPS[name]
    if not extra:
        return step
    return RingStep(functools.partial(step.forward, **extra), functools.partial(step.backward, **extra))


_Q_AXES = ("batch", "length", "act_heads", None)
_KV_AXES = ("batch", None, "act_heads", None)


def local_attention(
    q,
    k,
    v,
    *,
    key_mask=None,
    implementation: str = "xla",
    precision=None,
    key_mask_prefix: bool = False,
    pad_queries: bool = False,
    residual_name: str | None = None,
):
    """`dot_product_attention` on arrays this device holds whole (inside a shard_map, or with no
    mesh): the backend is called directly."""
    name, extra = _resolve(implementation)
    fn = BACKENDS[name]
    out = fn(
        q,
        k,
        v,
        key_mask,
        precision,
        key_mask_prefix=key_mask_prefix,
        pad_queries=pad_queries,
        residual_name=residual_name,
        **extra,
    )
    if residual_name and name in ("xla", "cudnn"):
        # These name nothing inside (XLA's residuals are the probabilities; cuDNN's are internal to
        # jax's primitive): tag the output itself, which the output projection's backward needs.
        out = checkpoint_name(out, residual_name)
    if pad_queries and key_mask is not None:
        # Padded positions are not queries: zero rows, the same from every backend.
        out = jnp.where(key_mask[:, :, None, None], out, jnp.zeros_like(out))
    return out


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    implementation: str = "xla",
    precision=None,
    key_mask_prefix: bool = False,
    pad_queries: bool = False,
    residual_name: str | None = None,
) -> jax.Array:
    """softmax(q·kᵀ/√d)·v over [batch, length, heads, head_dim] inputs.

    key_mask: [batch, kv_length] bool, True where a key may be attended to.
    key_mask_prefix: the valid keys of every sample come first (a padding mask).
    pad_queries: q and k are one sequence (self-attention) and key_mask also marks which queries
      are padding; their output rows are zero. Needs key_mask_prefix.
    residual_name: `checkpoint_name` of what the fused kernels keep for their backward (output
      and log-sum-exp; splash and chunked), so a named remat policy can save them.
    Under `sharding.activation_sharding` a kernel backend runs per shard: batch and heads as the
    rules shard them, queries also split over `length` (the keys whole: XLA gathers them).
    """
    _resolve(implementation)
    if pad_queries and not key_mask_prefix:
        raise ValueError("pad_queries=True needs key_mask_prefix=True (padding comes last)")
    ctx = sharding.current_context()
    if ctx is None or implementation not in KERNEL_BACKENDS:
        return local_attention(
            q,
            k,
            v,
            key_mask=key_mask,
            implementation=implementation,
            precision=precision,
            key_mask_prefix=key_mask_prefix,
            pad_queries=pad_queries,
            residual_name=residual_name,
        )
    mesh, rules = ctx
    q_spec = sharding.spec_for_shape(q.shape, _Q_AXES, mesh, rules)
    kv_spec = sharding.spec_for_shape(k.shape, _KV_AXES, mesh, rules)
    if (q_spec[0], q_spec[2]) != (kv_spec[0], kv_spec[2]):
        raise ValueError(
            f"attention: queries {q.shape} and keys {k.shape} shard batch/heads differently ({q_spec} vs {kv_spec})"
        )
    if q_spec[1] is not None:
        # A length shard of the queries is not the prefix the key mask describes.
        pad_queries = False
    body = functools.partial(
        local_attention,
        implementation=implementation,
        precision=precision,
        key_mask_prefix=key_mask_prefix,
        pad_queries=pad_queries,
        residual_name=residual_name,
    )
    key_mask = _full_mask(k, key_mask)
    mask_spec = PartitionSpec(kv_spec[0], None)
    return jax.shard_map(
        lambda q_, k_, v_, m_: body(q_, k_, v_, key_mask=m_),
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, key_mask)


def head_dim_cost(head_dim: int, lanes: int = SPLASH_LANES) -> float:
    """Kernel work relative to the true head dim after padding to the lane width (72 → 1.78×)."""
    return _round_up(head_dim, lanes) / head_dim if lanes else 1.0
