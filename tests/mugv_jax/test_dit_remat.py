"""Remat policies change memory, not math; a named policy saves exactly the activations it names."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

import mugv_jax.dit as dit
from tests.helpers import DIT_WEIGHTS, case_inputs

# Recompute replays the same float32 ops; XLA may fuse them differently.
GRAD_RTOL = 1e-5


def _loss_and_params(policy, attention="xla"):
    args, kwargs = case_inputs("i2v")
    model = dit.load(DIT_WEIGHTS, "tiny", options=dit.RuntimeOptions(remat=policy, attention=attention))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def loss(p):
        out = dit.forward(p, model.config, model.options, *args, **kwargs)
        return jnp.mean(out[:, :24] ** 2)

    return loss, params, model.config, args[0].shape[0]


def test_remat_policies_give_identical_gradients():
    grads = {}
    for policy in ("none", "full", "dots", "save_qkv_attn"):
        loss, params, _, _ = _loss_and_params(policy)
        grads[policy] = jax.jit(jax.grad(loss))(params)
    ref = jax.tree.leaves(grads["none"])
    for policy in ("full", "dots", "save_qkv_attn"):
        for a, b in zip(jax.tree.leaves(grads[policy]), ref):
            np.testing.assert_allclose(a, b, rtol=GRAD_RTOL, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in ref)


def _scan_residuals(policy, attention):
    """What the backward of the scanned blocks keeps: {shape+dtype: count} of the scan's residuals."""
    loss, params, config, batch = _loss_and_params(policy, attention)
    res = saved_residuals(loss, params)
    return Counter(f"{a.shape}{a.dtype.name}" for a, where in res if "scan" in where), config, batch


@pytest.mark.parametrize("attention", ["xla", "chunked"])
def test_named_policies_save_exactly_what_they_name(attention):
    """Against `full` (only each layer's input kept), a named policy adds exactly its activations,
    stacked over the layers: qkv_proj [L, B, N, 3, H, D]; attn_out [L, B, N, H, D] and, from the
    fused kernel, its log-sum-exp [L, B, H, N], so its forward is not re-run."""
    full, c, b = _scan_residuals("full", attention)
    n = next(int(k.split(", ")[2]) for k in full)  # tokens, read off the layer inputs [L, B, N, C]
    L, h, d = c.depth, c.num_heads, c.head_dim
    qkv = f"{(L, b, n, 3, h, d)}float32"
    out = f"{(L, b, n, h, d)}float32"
    lse = f"{(L, b, h, n)}float32"
    attn = {out: 1, lse: 1} if attention == "chunked" else {out: 1}
    assert list(full) == [f"{(L, b, n, c.hidden_size)}float32"], full  # the layer inputs
    for policy, want in (("save_qkv_proj", {qkv: 1}), ("save_attn_out", attn), ("save_qkv_attn", {qkv: 1, **attn})):
        got, _, _ = _scan_residuals(policy, attention)
        assert dict(got - full) == want and not (full - got), (policy, got - full)
