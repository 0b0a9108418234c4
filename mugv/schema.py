"""The canonical parameter schema: the official release's state-dict names and shapes.

The release `dit.pt` is a flat {name: tensor} dict in PyTorch conventions (Linear weights are
[out, in], the patch embed is a Conv3d weight [C, C_in, kt, kh, kw]). Every other layout in this
project is defined as a map to and from these names, so this one function is the spine of the
converters and of the loaders.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from mugv.config import PRESETS, DiTConfig

Shape = tuple[int, ...]


def _embedder(prefix: str, c: int, freq: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.mlp.0.weight", (c, freq)
    yield f"{prefix}.mlp.0.bias", (c,)
    yield f"{prefix}.mlp.2.weight", (c, c)
    yield f"{prefix}.mlp.2.bias", (c,)


def block_schema(config: DiTConfig, index: int) -> dict[str, Shape]:
    """Names and shapes of one transformer block, in release order."""
    c, d, f = config.hidden_size, config.head_dim, config.mlp_hidden_size
    p = f"blocks.{index}."
    return {
        p + "scale_shift_table": (6, c),
        p + "attn.qkv.weight": (3 * c, c),
        p + "attn.qkv.bias": (3 * c,),
        p + "attn.q_norm.weight": (d,),
        p + "attn.k_norm.weight": (d,),
        p + "attn.proj.weight": (c, c),
        p + "attn.proj.bias": (c,),
        p + "cross_attn_norm.weight": (c,),
        p + "cross_attn_norm.bias": (c,),
        p + "cross_attn.q_linear.weight": (c, c),
        p + "cross_attn.q_linear.bias": (c,),
        p + "cross_attn.kv_linear.weight": (2 * c, c),
        p + "cross_attn.kv_linear.bias": (2 * c,),
        p + "cross_attn.q_norm.weight": (d,),
        p + "cross_attn.k_norm.weight": (d,),
        p + "cross_attn.proj.weight": (c, c),
        p + "cross_attn.proj.bias": (c,),
        p + "mlp.fc1.weight": (f, c),
        p + "mlp.fc1.bias": (f,),
        p + "mlp.fc2.weight": (c, f),
        p + "mlp.fc2.bias": (c,),
    }


def release_schema(config: DiTConfig) -> dict[str, Shape]:
    """Every tensor of the release state dict for `config`: name → shape, in the release order."""
    c = config.hidden_size
    out: dict[str, Shape] = {
        "start_token": (c,),
        "end_token": (c,),
        "x_embedder.proj.weight": (c, config.in_channels, *config.patch_size),
        "x_embedder.proj.bias": (c,),
    }
    out.update(_embedder("t_embedder", c, config.frequency_dim))
    out.update(_embedder("fps_embedder", c, config.frequency_dim))
    out.update(
        {
            "t_block.1.weight": (6 * c, c),
            "t_block.1.bias": (6 * c,),
            "y_embedder.y_proj.fc1.weight": (c, config.text_dim),
            "y_embedder.y_proj.fc1.bias": (c,),
            "y_embedder.y_proj.fc2.weight": (c, c),
            "y_embedder.y_proj.fc2.bias": (c,),
        }
    )
    for i in range(config.depth):
        out.update(block_schema(config, i))
    out.update(
        {
            "final_layer.scale_shift_table": (2, c),
            "final_layer.linear.weight": (config.patch_volume * config.out_channels, c),
            "final_layer.linear.bias": (config.patch_volume * config.out_channels,),
        }
    )
    return out


def num_params(schema: dict[str, Shape]) -> int:
    return sum(math.prod(s) for s in schema.values())


def check_state_dict_shapes(found: dict[str, Shape], expected: dict[str, Shape], source: str) -> None:
    """Strict comparison of a checkpoint's names/shapes against a schema.

    Raises ValueError naming every missing, unexpected and mis-shaped tensor (with both shapes) and
    the file it came from, so a bad checkpoint is never half-loaded.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    bad_shape = [
        (k, tuple(found[k]), tuple(expected[k]))
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or bad_shape):
        return
    lines = [f"checkpoint {source} does not match the model schema:"]
    limit = 20
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected)):
        if items:
            shown = ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")
            lines.append(f"  {title} ({len(items)}): {shown}")
    for k, got, want in bad_shape[:limit]:
        lines.append(f"  tensor {k}: shape {list(got)} in checkpoint, model expects {list(want)}")
    if len(bad_shape) > limit:
        lines.append(f"  … and {len(bad_shape) - limit} more mis-shaped tensors")
    raise ValueError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The model configuration from tensor shapes
#
# Shapes fix depth, hidden size, heads (hidden / head dim, the q_norm size), text width, patch,
# channels, MLP ratio and the sinusoid width. Fields no tensor shows (RoPE table sizes, norm eps,
# max caption length) take a preset's values when the shapes match that preset, otherwise the
# DiTConfig defaults.

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Fields that some tensor shape determines; the rest cannot be detected.
SHAPE_FIELDS = (
    "depth",
    "hidden_size",
    "num_heads",
    "patch_size",
    "in_channels",
    "out_channels",
    "text_dim",
    "mlp_ratio",
    "frequency_dim",
)


def as_shape(e) -> tuple[int, ...]:
    """A shape tuple, or anything with a `.shape` (an `mugv.io.base.Entry`, an array)."""
    return tuple(e.shape) if hasattr(e, "shape") else tuple(e)


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
        raise ValueError(
            f"cannot detect the number of heads: hidden {c} is not a multiple of the q_norm size {head_dim}"
        )
    f, _ = _shape(entries, "blocks.0.mlp.fc1.weight")
    _, text_dim = _shape(entries, "y_embedder.y_proj.fc1.weight")
    _, freq = _shape(entries, "t_embedder.mlp.0.weight")
    out_features, _ = _shape(entries, "final_layer.linear.weight")
    volume = patch[0] * patch[1] * patch[2]
    fields = dict(
        depth=max(layers) + 1,
        hidden_size=c,
        num_heads=c // head_dim,
        patch_size=tuple(patch),
        in_channels=cin,
        out_channels=out_features // volume,
        text_dim=text_dim,
        mlp_ratio=f / c,
        frequency_dim=freq,
    )
    for preset in PRESETS.values():
        if shape_fields(preset) == fields:
            return preset
    return DiTConfig(**fields)


def preset_name(config: DiTConfig) -> str | None:
    for name, preset in PRESETS.items():
        if preset == config:
            return name
    return None
