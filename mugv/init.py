"""One definition of a fresh run's initial weights, for every backend.

A run without `config.init_from` starts from random weights. Each backend's own initialisers
(jax.random, torch's generator under megatron's init methods) draw the same distributions from
different streams, so `python -m mugv_jax.train` and `python -m mugv_megatron.train` on one config
and seed started from different weights and logged different losses from the first step. Both
trainers take their fresh weights from here instead, in release names (mugv/schema.py) and
layout, as `config.init_from` would give them.

Distributions: the reference trainer's (docs/reference.md §1.8): the Megatron linears (qkv, q,
kv, fc1) N(0, 0.014), the output projections (both attention projections, fc2) N(0, 0.014/√(2L)),
their biases 0; norm weights 1, biases 0; the modulation tables N(0, 1)/√C; start/end tokens
N(0, 0.02); every other linear and the patch-embedding conv PyTorch's default U(±1/√fan_in),
weights and biases alike.

Each tensor has its own numpy stream, keyed by (seed, tensor name), so any subset (a pipeline
stage's layers, one tensor at a time) is drawn without the rest: `InitialWeights` is a lazy
mapping that draws a tensor when asked and keeps nothing.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from mugv.config import DiTConfig
from mugv.schema import release_schema

INIT_STD = 0.014  # --init-method-std of the reference launchers, every model size
TOKEN_STD = 0.02

_BLOCK = re.compile(r"^blocks\.\d+\.(.+)$")
_MEGATRON_LINEARS = ("attn.qkv", "cross_attn.q_linear", "cross_attn.kv_linear", "mlp.fc1")
_OUTPUT_LINEARS = ("attn.proj", "cross_attn.proj", "mlp.fc2")
_ONES = ("attn.q_norm.weight", "attn.k_norm.weight", "cross_attn.q_norm.weight", "cross_attn.k_norm.weight")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, zlib.crc32(name.encode())]))


def _normal(rng, shape, std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _torch_default(rng, shape, fan_in: int) -> np.ndarray:
    bound = np.float32(1.0 / math.sqrt(fan_in))
    return (rng.random(shape, dtype=np.float32) * np.float32(2.0) - np.float32(1.0)) * bound


def initial_tensor(config: DiTConfig, name: str, seed: int) -> np.ndarray:
    """The fresh float32 value of release tensor `name` for a run with `seed`."""
    shape = release_schema(config).get(name)
    if shape is None:
        raise KeyError(f"{name!r} is not a tensor of the model ({config})")
    rng = _rng(seed, name)
    m = _BLOCK.match(name)
    if m:
        sub = m.group(1)
        if sub == "scale_shift_table":
            return _normal(rng, shape, 1.0 / math.sqrt(config.hidden_size))
        if sub in _ONES or sub == "cross_attn_norm.weight":
            return np.ones(shape, np.float32)
        module, kind = sub.rsplit(".", 1)
        if kind == "bias":
            return np.zeros(shape, np.float32)
        if module in _MEGATRON_LINEARS:
            return _normal(rng, shape, INIT_STD)
        if module in _OUTPUT_LINEARS:
            return _normal(rng, shape, INIT_STD / math.sqrt(2 * config.depth))
        raise AssertionError(f"no initialisation rule for block tensor {name}")
    if name in ("start_token", "end_token"):
        return _normal(rng, shape, TOKEN_STD)
    if name == "final_layer.scale_shift_table":
        return _normal(rng, shape, 1.0 / math.sqrt(config.hidden_size))
    # PyTorch's default for the weight and the bias of a linear (fan_in: its input width) or of
    # the patch-embedding conv (fan_in: channels × kernel volume).
    weight_shape = release_schema(config)[name.rsplit(".", 1)[0] + ".weight"]
    return _torch_default(rng, shape, math.prod(weight_shape[1:]))


class InitialWeights(Mapping):
    """{release name: fresh float32 array} of a run's seed, each drawn when read (nothing kept)."""

    def __init__(self, config: DiTConfig, seed: int):
        self.config, self.seed = config, int(seed)
        self._names = list(release_schema(config))

    def __getitem__(self, name: str) -> np.ndarray:
        return initial_tensor(self.config, name, self.seed)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
