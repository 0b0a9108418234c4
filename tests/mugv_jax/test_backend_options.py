"""mugv_jax/backend_options.py: the VAE's convolutions leave YNNPACK on a CPU; callers' options win."""

import re

import jax
import jax.numpy as jnp

from mugv_jax import backend_options
from mugv_jax.vae import jit as vae_jit
from mugv_jax.vae.checkpoint import random_vae


def _ynn_convolutions(hlo: str) -> int:
    """Convolutions inside a computation that a __ynn_fusion calls."""
    ynn_calls = set(re.findall(r"fusion\([^\n]*calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo))
    count = 0
    for name in ynn_calls:
        body = re.search(r"^%" + re.escape(name) + r" .*?^}", hlo, re.S | re.M).group(0)
        count += len(re.findall(r"= \S+ convolution\(", body))
    return count


def test_cpu_default_and_callers_options_over_it():
    assert jax.default_backend() == "cpu"
    assert backend_options.convolution_options() == backend_options.CPU_CONVOLUTION
    mine = {"xla_backend_optimization_level": 0}
    assert backend_options.convolution_options(mine) == {**backend_options.CPU_CONVOLUTION, **mine}
    key = next(iter(backend_options.CPU_CONVOLUTION))
    assert backend_options.convolution_options({key: "LIBRARY_FUSION_TYPE_DOT"})[key] == "LIBRARY_FUSION_TYPE_DOT"


def test_jitted_vae_convolutions_are_not_in_ynn_fusions():
    # The baseline: with XLA's defaults a convolution is handed to YNNPACK (were it not, the
    # option would be moot and this test could not tell the two apart: re-measure then).
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    args = (jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64)))
    assert _ynn_convolutions(jax.jit(lambda x, w: conv(x, w).sum(-1)).lower(*args).compile().as_text()) == 1

    jv = vae_jit(random_vae("tiny", seed=0))
    network = jv._network("encode_frames", capture=False)
    hlo = network.lower(jv._parts["spatial_vae"][1], jnp.zeros((4, 16, 16, 3))).compile().as_text()
    assert "convolution(" in hlo
    assert _ynn_convolutions(hlo) == 0


def test_unknown_option_sets_nothing(monkeypatch):
    monkeypatch.setattr(
        backend_options, "CPU_CONVOLUTION", {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NO_SUCH"}
    )
    assert backend_options.convolution_options() is None
    assert backend_options.convolution_options({"xla_backend_optimization_level": 0}) == {
        "xla_backend_optimization_level": 0
    }
