"""Width expansion (mugv_jax/recipe/expand.py) preserves the function of a trained DiT."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mugv_jax.dit as dit
from mugv_jax.dit.model import RuntimeOptions, forward
from mugv_jax.recipe import expand
from tests.helpers import DIT_WEIGHTS, case_inputs, max_abs

# Exact tiling is exact in real arithmetic; float32 reorders the e-way sums (measured 1.7e-6
# max abs on outputs of magnitude ~2.7).
EXACT_ATOL = 1e-5
# Independent noise of 1% of each tensor's std moves outputs by ~5e-2 (measured 0.051); the band
# asserts it is visible but small next to the output scale (~2.7).
INDEPENDENT_NOISE_RANGE = (1e-3, 0.2)
NOISE_STD = 1e-2


@pytest.fixture(scope="module")
def small():
    m = dit.load(DIT_WEIGHTS, "tiny")
    return m.config, nnx.to_pure_dict(nnx.state(m, nnx.Param))


@functools.cache
def _jit_forward(config):
    return jax.jit(lambda p, *a, **k: forward(p, config, RuntimeOptions(), *a, **k))


def _out(config, params, case="i2v"):
    # i2v golden inputs: non-square 6x10 latents, 4 frames (first one conditioning), padded caption.
    args, kwargs = case_inputs(case)
    return np.asarray(_jit_forward(config)(params, *args, **kwargs))


@pytest.fixture(scope="module")
def reference_out(small):
    return _out(*small)


def test_widened_config_keeps_head_dim_and_depth(small):
    cfg, _ = small
    wide = expand.widened_config(cfg, 2)
    assert (wide.hidden_size, wide.num_heads, wide.head_dim, wide.depth) == (288, 4, 72, cfg.depth)
    # The paper's step: 1728 hidden / 24 heads of 72 -> 3456 / 48 (the 10b preset).
    from mugv.config import get_config

    assert expand.widened_config(get_config("10b").replace(hidden_size=1728, num_heads=24), 2) == get_config("10b")
    with pytest.raises(ValueError, match="positive integer"):
        expand.widened_config(cfg, 1.5)


def test_exact_expansion_preserves_output(small, reference_out):
    cfg, params = small
    wide_cfg, wide = expand.expand_params(params, cfg, 2, noise_std=0.0)
    assert wide["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 288, 3, 4, 72)
    assert max_abs(_out(wide_cfg, wide), reference_out) <= EXACT_ATOL


def test_zero_sum_noise_preserves_output_but_breaks_symmetry(small, reference_out):
    cfg, params = small
    wide_cfg, exact = expand.expand_params(params, cfg, 2, noise_std=0.0)
    _, noisy = expand.expand_params(params, cfg, 2, noise_std=NOISE_STD, noise_mode="zero_sum", seed=1)
    k_exact, k_noisy = (np.asarray(p["blocks"]["mlp"]["fc2"]["kernel"]) for p in (exact, noisy))
    assert max_abs(k_exact, k_noisy) > 0  # weights did change
    assert max_abs(_out(wide_cfg, noisy), reference_out) <= EXACT_ATOL

    # Symmetry: with exact tiling both copies of every MLP unit get the same gradient (they would
    # stay copies forever); with zero-sum noise they get different ones.
    args, kwargs = case_inputs("i2v")
    loss = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(forward(p, wide_cfg, RuntimeOptions(), *args, **kwargs)))))
    f = wide_cfg.mlp_hidden_size // 2
    for params_, should_differ in ((exact, False), (noisy, True)):
        g = np.asarray(loss(params_)["blocks"]["mlp"]["fc1"]["kernel"])  # [L, 2C, 2F]
        gap = max_abs(g[..., :f], g[..., f:]) / np.max(np.abs(g))
        assert (gap > 1e-3) if should_differ else (gap < 1e-4), (should_differ, gap)


def test_independent_noise_moves_output_a_little(small, reference_out):
    cfg, params = small
    wide_cfg, noisy = expand.expand_params(params, cfg, 2, noise_std=NOISE_STD, noise_mode="independent")
    err = max_abs(_out(wide_cfg, noisy), reference_out)
    assert INDEPENDENT_NOISE_RANGE[0] < err < INDEPENDENT_NOISE_RANGE[1], err


def test_zero_sum_noise_statistics():
    rng = np.random.default_rng(0)
    z = expand._zero_sum_noise(rng, (3, 40, 50), 1, 2, 0.5)
    np.testing.assert_allclose(z[:, :20] + z[:, 20:], 0.0, atol=1e-6)
    assert 0.45 < z.std() < 0.55


def test_cli_writes_a_checkpoint_the_trainer_can_init_from(small, tmp_path):
    from mugv.io.weights import load_params as jax_params

    cfg, params = small
    src = tmp_path / "small"
    expand.save_params(params, cfg, str(src))
    assert (
        expand.main(["--src", f"jax:{src}", "--dst", str(tmp_path / "wide"), "--factor", "2", "--noise-std", "0"]) == 0
    )
    got_cfg, got = jax_params(f"jax:{tmp_path / 'wide'}", weights="ema")
    assert got_cfg == expand.widened_config(cfg, 2)
    _, want = expand.expand_params(params, cfg, 2, noise_std=0.0)
    np.testing.assert_array_equal(got["t_block"]["kernel"], want["t_block"]["kernel"])
    with pytest.raises(SystemExit):
        expand.main(["--src", f"jax:{src}", "--dst", str(tmp_path / "wide")])  # refuses a non-empty dst
