"""Build the (data, fsdp, tensor, context) device mesh from the config.

Sizes may be −1 ("all remaining devices", at most one axis). `dcn` sizes give the multi-slice
(data-centre network) factor of each axis; the ICI sizes are per slice. On one slice `dcn` is all
ones and the mesh is a plain reshape of the devices (topology-aware where JAX knows the hardware).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from mugv_jax.parallel.sharding import MESH_AXES


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int, what: str = "mesh") -> tuple[int, ...]:
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"{what}: unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    vals = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if sum(v == -1 for v in vals) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {dict(zip(MESH_AXES, vals))}")
    fixed = math.prod(v for v in vals if v != -1)
    if any(v == 0 or v < -1 for v in vals):
        raise ValueError(f"{what}: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, vals))}")
    if -1 in vals:
        if num_devices % fixed:
            raise ValueError(
                f"{what}: {num_devices} devices are not divisible by the fixed axes' "
                f"product {fixed} ({dict(zip(MESH_AXES, vals))})"
            )
        vals[vals.index(-1)] = num_devices // fixed
    if math.prod(vals) != num_devices:
        raise ValueError(
            f"{what}: axis sizes {dict(zip(MESH_AXES, vals))} multiply to "
            f"{math.prod(vals)}, but there are {num_devices} devices"
        )
    return tuple(vals)


def build_mesh(
    ici: Mapping[str, int], dcn: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    dcn = dict(dcn or {})
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    dcn_sizes = resolve_axis_sizes(dcn, num_slices, "mesh.dcn") if dcn or num_slices > 1 else (1,) * 4
    ici_sizes = resolve_axis_sizes(ici, len(devices) // math.prod(dcn_sizes), "mesh.ici")
    if math.prod(dcn_sizes) > 1:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices)
    else:
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(ici_sizes, devices)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.array(devices).reshape(ici_sizes)
    return Mesh(arr, MESH_AXES)


def describe(mesh: Mesh) -> str:
    return "mesh(" + ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f") over {mesh.size} devices"
