"""XLA compiler options the convolution networks (the VAE) get by default, per backend.

On a CPU, XLA hands convolutions to the YNNPACK library by default; on one core at the release
VAE's shapes its convolutions reach 86–99 GFLOP/s where XLA's own (Eigen) convolution reaches
~106, and the release VAE encodes and decodes ~11% faster with only the dots handed to YNNPACK
(`bench/cpu_vs_torch.py --parts vae`, docs/benchmarks.md). The DiT, whose time is dots, is the
same either way, so it keeps XLA's defaults.

The option is experimental in XLA: where this jaxlib does not know the value, nothing is set
(one probe compile per process says which). A caller's own options are applied over these.
"""

from __future__ import annotations

import functools

import jax

CPU_CONVOLUTION = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _accepted(options: tuple) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    except jax.errors.JaxRuntimeError as e:
        if "INVALID_ARGUMENT" in str(e):
            return False
        raise
    return True


def convolution_options(user: dict | None = None) -> dict | None:
    """The compiler options for a convolution network on jax's default backend, with the caller's
    `user` options over them; None where there are none (jax.jit's default)."""
    backend = jax.default_backend()
    base = CPU_CONVOLUTION if backend == "cpu" and _accepted(tuple(CPU_CONVOLUTION.items())) else {}
    merged = {**base, **(user or {})}
    return merged or None
