"""LoRA adapters of the JAX DiT (the definition is mugv/lora.py): their nested params next to
each adapted kernel (`blocks.attn.qkv.lora_a` [L, C, r], `.lora_b` [L, r, 3, H, D]), their
logical axes for the one sharding table, and the split of a model's params into what trains and
what stays frozen."""

from __future__ import annotations

import numpy as np

from mugv.config import DiTConfig
from mugv.layouts import jax as jax_layout
from mugv.lora import FreezeConfig, LoraConfig, adapter_name, init_adapter

LORA_KEYS = jax_layout.LORA_KEYS


def init_params(config: DiTConfig, lora: LoraConfig) -> dict:
    """Every adapter at the start of training (numpy float32, JAX layout, stacked over layers)."""
    values = {}
    for i in range(config.depth):
        for site in lora.sites():
            for which, arr in zip("AB", init_adapter(config, lora, i, site), strict=True):
                values[adapter_name(i, site, which)] = arr
    return from_release(values, config)


def from_release(adapters: dict[str, np.ndarray], config: DiTConfig) -> dict:
    """Nested JAX adapters (stacked over layers) of release-named ones (e.g. a PEFT import)."""
    return jax_layout.adapters_from_release(adapters, config)


def to_release(adapters: dict) -> dict[str, np.ndarray]:
    """Release-named float32 adapters of a nested JAX adapter tree (a state's `params` or `ema`)."""
    return jax_layout.adapters_to_release(adapters)


def logical_axes(config: DiTConfig, lora: LoraConfig, base_axes: dict) -> dict:
    """Nested logical axes of the adapters: A over its kernel's input axes, B over its output axes
    (`base_axes` is the model's nested {…: kernel axes} tree)."""
    flat_base = jax_layout.flatten(base_axes)
    out = {}
    for site in lora.sites():
        ins, _ = jax_layout.adapter_split(site.release, config)
        kernel = flat_base[jax_layout.adapter_jax_path(site.release, "A").rsplit(".", 1)[0] + ".kernel"]
        lead, in_axes, out_axes = kernel[:1], kernel[1 : 1 + len(ins)], kernel[1 + len(ins) :]
        out[jax_layout.adapter_jax_path(site.release, "A")] = (*lead, *in_axes, "lora_rank")
        out[jax_layout.adapter_jax_path(site.release, "B")] = (*lead, "lora_rank", *out_axes)
    return jax_layout.unflatten(out)


def merge(a: dict, b: dict) -> dict:
    """Two nested trees with disjoint leaves as one."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def split(tree: dict, lora: LoraConfig, freeze: FreezeConfig, path: tuple = ()) -> tuple[dict, dict]:
    """(trainable, frozen) parts of a nested params tree (or one shaped like it): under LoRA only
    the adapters train; otherwise everything outside `freeze.modules`."""
    trainable, frozen = {}, {}
    for k, v in tree.items():
        p = (*path, k)
        if isinstance(v, dict):
            t, f = split(v, lora, freeze, p)
            if t:
                trainable[k] = t
            if f:
                frozen[k] = f
        elif (k in LORA_KEYS) if lora.on else (p[0] not in freeze.modules):
            trainable[k] = v
        else:
            frozen[k] = v
    return trainable, frozen
