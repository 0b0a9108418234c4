"""The model configuration a conversion uses: given, stored in the checkpoint, or detected from
the tensor shapes (`mugv.schema.detect_config`), and always checked against the shapes."""

from __future__ import annotations

import dataclasses

from mugv.config import DiTConfig
from mugv.schema import as_shape, check_state_dict_shapes, detect_config, preset_name, release_schema


def resolve_config(
    entries: dict, *, model: DiTConfig | None, stored: DiTConfig | None, source: str
) -> tuple[DiTConfig, str]:
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
