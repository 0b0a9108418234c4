"""The model configuration of a checkpoint, from its tensor shapes (release names).

Shapes fix depth, hidden size, heads (hidden / head dim, the q_norm size), text width, patch,
channels, MLP ratio and the sinusoid width. Fields no tensor shows (RoPE table sizes, norm eps,
max caption length) take a preset's values when the shapes match that preset, otherwise the
DiTConfig defaults.
"""
from __future__ import annotations

import dataclasses
import re

from mugv.config import PRESETS, DiTConfig
from mugv.io.base import Entry
from mugv.schema import check_state_dict_shapes, release_schema

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Fields that some tensor shape determines; the rest cannot be detected.
SHAPE_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "out_channels",
                "text_dim", "mlp_ratio", "frequency_dim")


def as_shape(e) -> tuple[int, ...]:
    return e.shape if isinstance(e, Entry) else tuple(e)


def _shape(entries, name):
    if name not in entries:
        raise ValueError(f"cannot detect the model configuration: the checkpoint has no {name}")
    return as_shape(entries[name])


def shape_fields(config: DiTConfig) -> dict:
    return {f: getattr(config, f) for f in SHAPE_FIELDS}


def detect_config(entries: dict) -> DiTConfig:
    """A DiTConfig for a {release name: shape or Entry} mapping; raises naming what is missing."""
    c, cin, *patch = _shape(entries, "x_embedder.proj.weight")
    layers = {int(m.group(1)) for n in entries if (m := _BLOCK.match(n))}
    if not layers:
        raise ValueError("cannot detect the model configuration: the checkpoint has no blocks.*")
    (head_dim,) = _shape(entries, "blocks.0.attn.q_norm.weight")
    if head_dim == 0 or c % head_dim:
        raise ValueError(f"cannot detect the number of heads: hidden {c} is not a multiple of the "
                         f"q_norm size {head_dim}")
    f, _ = _shape(entries, "blocks.0.mlp.fc1.weight")
    _, text_dim = _shape(entries, "y_embedder.y_proj.fc1.weight")
    _, freq = _shape(entries, "t_embedder.mlp.0.weight")
    out_features, _ = _shape(entries, "final_layer.linear.weight")
    volume = patch[0] * patch[1] * patch[2]
    fields = dict(depth=max(layers) + 1, hidden_size=c, num_heads=c // head_dim,
                  patch_size=tuple(patch), in_channels=cin, out_channels=out_features // volume,
                  text_dim=text_dim, mlp_ratio=f / c, frequency_dim=freq)
    for preset in PRESETS.values():
        if shape_fields(preset) == fields:
            return preset
    return DiTConfig(**fields)


def preset_name(config: DiTConfig) -> str | None:
    for name, preset in PRESETS.items():
        if preset == config:
            return name
    return None


def resolve_config(entries: dict, *, model: DiTConfig | None, stored: DiTConfig | None,
                   source: str) -> tuple[DiTConfig, str]:
    """The config to convert with and where it came from: --model, the checkpoint's own, or
    detected. A given or stored config must agree with the shapes (else a clear error)."""
    if model is not None:
        config, origin = model, "given"
    elif stored is not None:
        config, origin = stored, "stored in the checkpoint"
    else:
        config, origin = detect_config(entries), "detected from the tensor shapes"
    shapes = {n: as_shape(e) for n, e in entries.items()}
    check_state_dict_shapes(shapes, release_schema(config), source)
    return config, origin


def describe_config(config: DiTConfig) -> str:
    name = preset_name(config)
    parts = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    return f"{name} ({parts})" if name else parts
