"""Scaled dot-product attention behind one function, so backends can be swapped by name.

Backends (RuntimeOptions.attention):
- "xla":    einsum + softmax; the reference, runs everywhere.
- "cudnn":  cuDNN fused flash attention via `jax.nn.dot_product_attention` (NVIDIA GPU, bf16/fp16).
- "pallas": a portable Pallas flash-attention forward kernel (online softmax over key blocks);
            interpret mode on CPU, where it is tested against "xla". Its backward recomputes
            through the XLA reference (correct, not memory-optimal; use "splash" on TPU).
- "splash": the TPU Pallas splash-attention kernel (forward and backward fused).
Head dim 72 (the release's): Pallas kernels on TPU want the head dim on the 128-lane axis, so
"splash" zero-pads q/k/v to 128 (exact: zero columns add nothing to q·kᵀ and come out as zero
output columns that are cut off; the softmax scale uses the true head dim). cuDNN and the generic
Pallas kernel take 72 directly (a multiple of 8). See docs/scaling.md for the cost.

Masks. Every backend takes a per-key validity mask. The fused kernels want it in their own form:
cuDNN as per-sample sequence lengths (`cudnn_arguments`: its boolean `mask` argument becomes an
additive bias, which selects the slower bias kernels and is refused in the [B,1,1,S] shape), the
Pallas kernels as segment ids / a key-validity row. Two facts about a mask let the kernels skip
work: `key_mask_prefix` (valid keys come first, as padding does) and `pad_queries` (self-attention
over a padded sequence: the padded positions are queries too; their output rows are zero).

Sharding. The kernel backends are custom calls that XLA's partitioner cannot split (a Pallas call
would be all-gathered and computed whole on every device), so under `sharding.activation_sharding`
they run inside a `shard_map` over the batch, head and (for queries) length axes; each device
calls the kernel on its own shard. Context parallelism (ring, Ulysses) wraps these in
mugv_jax/parallel/context_parallel.py, which calls `local_attention` inside its own shard_map.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mugv_jax.parallel import sharding, xla_attention

_MASKED = -1e30


def _xla_attention(q, k, v, key_mask, precision):
    # A sample with no valid key attends to nothing: zero output instead of NaN.
    return xla_attention.attention(q, k, v, None if key_mask is None else key_mask.astype(bool), precision)


def _zero_if_no_key(out, key_mask):
    if key_mask is None:
        return out
    return jnp.where(jnp.any(key_mask, axis=-1)[:, None, None, None], out, jnp.zeros_like(out))


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


def _cudnn_attention(q, k, v, key_mask, precision, key_mask_prefix=False, pad_queries=False):
    if jax.default_backend() != "gpu":
        raise RuntimeError(
            f"attention='cudnn' needs an NVIDIA GPU, but the JAX backend is "
            f"{jax.default_backend()!r}; use attention='xla' (or 'splash' on TPU)"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention='cudnn' runs in bfloat16/float16, got {q.dtype}; set "
            f"compute_dtype='bfloat16' or use attention='xla'"
        )
    q, k, v, kwargs = cudnn_arguments(q, k, v, key_mask, key_mask_prefix=key_mask_prefix, pad_queries=pad_queries)
    out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
    return _zero_if_no_key(out, key_mask)


# --- portable Pallas flash attention -------------------------------------------------------------


def _round_up(x, m):
    return -(-x // m) * m


def _flash_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, *, block_k, num_k_blocks, scale):
    from jax.experimental import pallas as pl

    q = q_ref[...].astype(jnp.float32) * scale  # [bq, D]
    bq, d = q.shape

    def body(i, carry):
        m, l, acc = carry
        start = pl.multiple_of(i * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)  # [bk, D]
        v = v_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        valid = mask_ref[0, pl.ds(start, block_k)] > 0  # [bk]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m - m_new)
        return m_new, l * corr + p.sum(axis=-1), acc * corr[:, None] + jnp.dot(p, v)

    init = (jnp.full((bq,), _MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_k_blocks, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def _pallas_forward(q, k, v, key_mask, block: int = 128):
    from jax.experimental import pallas as pl

    b, nq, h, d = q.shape
    nk = k.shape[1]
    bq, bk = min(block, _round_up(nq, 8)), min(block, _round_up(nk, 8))
    nq_p, nk_p, d_p = _round_up(nq, bq), _round_up(nk, bk), _round_up(d, 8)
    mask = jnp.ones((b, nk), bool) if key_mask is None else key_mask
    mask = jnp.pad(mask, ((0, 0), (0, nk_p - nk))).astype(jnp.int32)[:, None, :]  # [B, 1, Nk]
    heads_first = lambda x, n: (
        jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, d_p - d))).transpose(0, 2, 1, 3).reshape(b * h, n, d_p)
    )
    qf, kf, vf = heads_first(q, nq_p), heads_first(k, nk_p), heads_first(v, nk_p)
    kernel = functools.partial(_flash_kernel, block_k=bk, num_k_blocks=nk_p // bk, scale=d**-0.5)
    out = pl.pallas_call(
        kernel,
        grid=(b * h, nq_p // bq),
        in_specs=[
            pl.BlockSpec((None, bq, d_p), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, nk_p, d_p), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((None, nk_p, d_p), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((None, 1, nk_p), lambda i, j: (jax.lax.div(i, h), 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, d_p), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((b * h, nq_p, d_p), q.dtype),
        interpret=jax.default_backend() == "cpu",
    )(qf, kf, vf, mask)
    return out.reshape(b, h, nq_p, d_p).transpose(0, 2, 1, 3)[:, :nq, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pallas_attention_vjp(q, k, v, key_mask, precision):
    return _pallas_forward(q, k, v, key_mask)


def _pallas_fwd(q, k, v, key_mask, precision):
    return _pallas_forward(q, k, v, key_mask), (q, k, v, key_mask)


def _pallas_bwd(precision, res, g):
    q, k, v, key_mask = res
    _, vjp = jax.vjp(lambda q_, k_, v_: _xla_attention(q_, k_, v_, key_mask, precision), q, k, v)
    return (*vjp(g), None)


_pallas_attention_vjp.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas_attention(q, k, v, key_mask, precision):
    return _pallas_attention_vjp(q, k, v, key_mask, precision)


# --- TPU splash attention ------------------------------------------------------------------------

SPLASH_LANES = 128  # TPU vector lane width: the head dim is padded up to a multiple of this


def _splash_attention(q, k, v, key_mask, precision, interpret: bool = False):
    if jax.default_backend() != "tpu" and not interpret:
        raise RuntimeError(
            f"attention='splash' needs a TPU, but the JAX backend is "
            f"{jax.default_backend()!r}; use attention='xla' or 'pallas'"
        )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, nq, h, d = q.shape
    nk = k.shape[1]
    d_p = _round_up(d, SPLASH_LANES)
    blk = 512 if min(nq, nk) >= 512 else 128
    nq_p, nk_p = _round_up(nq, blk), _round_up(nk, blk)
    # Scale before padding with the true head dim: the kernel itself does not scale.
    qs = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    prep = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, d_p - d))).transpose(0, 2, 1, 3)
    mask = jnp.ones((b, nk), bool) if key_mask is None else key_mask
    kv_ids = jnp.where(jnp.pad(mask, ((0, 0), (0, nk_p - nk))), 0, 1).astype(jnp.int32)
    q_ids = jnp.zeros((b, nq_p), jnp.int32)
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
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([sm.FullMask((nq_p, nk_p))] * h),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    out = jax.vmap(lambda q_, k_, v_, qi, ki: kernel(q_, k_, v_, segment_ids=sk.SegmentIds(qi, ki)))(
        prep(qs, nq_p), prep(k, nk_p), prep(v, nk_p), q_ids, kv_ids
    )
    out = out.transpose(0, 2, 1, 3)[:, :nq, :, :d].astype(q.dtype)
    return _zero_if_no_key(out, key_mask)


BACKENDS = {"xla": _xla_attention, "cudnn": _cudnn_attention, "pallas": _pallas_attention, "splash": _splash_attention}
# Custom calls that XLA's SPMD partitioner cannot split: run per shard under a mesh.
KERNEL_BACKENDS = ("cudnn", "pallas", "splash")

_Q_AXES = ("batch", "length", "act_heads", None)
_KV_AXES = ("batch", None, "act_heads", None)


def _backend(implementation: str):
    try:
        return BACKENDS[implementation]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; available: {sorted(BACKENDS)}"
        ) from None


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
):
    """`dot_product_attention` on arrays this device holds whole (inside a shard_map, or with no
    mesh): the backend is called directly."""
    fn = _backend(implementation)
    if implementation == "cudnn":
        out = fn(q, k, v, key_mask, precision, key_mask_prefix=key_mask_prefix, pad_queries=pad_queries)
    else:
        out = fn(q, k, v, key_mask, precision)
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
) -> jax.Array:
    """softmax(q·kᵀ/√d)·v over [batch, length, heads, head_dim] inputs.

    key_mask: [batch, kv_length] bool, True where a key may be attended to.
    key_mask_prefix: the valid keys of every sample come first (a padding mask).
    pad_queries: q and k are one sequence (self-attention) and key_mask also marks which queries
      are padding; their output rows are zero. Needs key_mask_prefix.
    Under `sharding.activation_sharding` a kernel backend runs per shard: batch and heads as the
    rules shard them, queries also split over `length` (the keys whole: XLA gathers them).
    """
    _backend(implementation)
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
    )
    if key_mask is None:
        return jax.shard_map(
            lambda q_, k_, v_: body(q_, k_, v_),
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec),
            out_specs=q_spec,
            check_vma=False,
        )(q, k, v)
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
