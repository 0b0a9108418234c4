"""Named remat policies change memory, not math: same loss and gradients as no remat."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mugv_jax.dit as dit
from tests.helpers import DIT_WEIGHTS, case_inputs

# Recompute replays the same float32 ops; XLA may fuse them differently.
GRAD_RTOL = 1e-5


def test_remat_policies_give_identical_gradients():
    args, kwargs = case_inputs("i2v")
    grads = {}
    for policy in ("none", "full", "dots"):
        model = dit.load(DIT_WEIGHTS, "tiny", options=dit.RuntimeOptions(remat=policy))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

        def loss(p):
            out = dit.forward(p, model.config, model.options, *args, **kwargs)
            return jnp.mean(out[:, :24] ** 2)

        grads[policy] = jax.jit(jax.grad(loss))(params)
    ref = jax.tree.leaves(grads["none"])
    for policy in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads[policy]), ref):
            np.testing.assert_allclose(a, b, rtol=GRAD_RTOL, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in ref)
