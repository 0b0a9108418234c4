"""Parameter layout of the Flax model: abstract 10B init, logical axes, release ⇄ JAX round trips."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import mugv_jax.dit as dit
from mugv.config import PRESETS
from mugv.layouts import jax as jax_layout
from mugv.schema import release_schema
from mugv_jax.parallel import sharding
from tests.helpers import GOLDEN, dit_weights


def _abstract_shapes(config):
    model = dit.abstract_model(config)
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_10b_abstract_init_yields_exactly_the_release_schema():
    cfg = PRESETS["10b"]
    variables = _abstract_shapes(cfg)  # jax.eval_shape underneath: nothing allocated
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in variables.values())
    shapes = {k: tuple(v.get_value().shape) for k, v in variables.items()}
    assert shapes == jax_layout.jax_param_shapes(cfg)
    # Map every abstract tensor through the layout (zero-stride stand-ins, no 40 GB allocation).
    mapped = {}
    for path, shape in shapes.items():
        stand_in = np.broadcast_to(np.float32(0), shape)
        layers = range(shape[0]) if jax_layout.is_stacked(path) else [None]
        for i in layers:
            name, arr = jax_layout.jax_to_release(path, stand_in if i is None else stand_in[i], cfg, layer=i)
            mapped[name] = list(arr.shape)
    with open(os.path.join(GOLDEN, "release_schema_10b.json")) as f:
        ref = json.load(f)["tensors"]
    assert mapped == ref
    assert sum(int(np.prod(s)) for s in shapes.values()) == 10_830_321_984


def test_every_parameter_has_logical_axes_with_a_rule():
    model = dit.abstract_model(PRESETS["tiny"])
    axes = sharding.param_logical_axes(model)
    shapes = jax_layout.jax_param_shapes(PRESETS["tiny"])
    assert set(axes) == set(shapes)
    for path, names in axes.items():
        assert names is not None and len(names) == len(shapes[path]), path
        if jax_layout.is_stacked(path):
            assert names[0] == "layers", path
        sharding.logical_to_spec(names)  # raises for a name without a rule


def test_logical_to_spec_uses_mesh_axes_once_and_drops_absent_ones():
    devices = np.array(jax.devices()[:8]).reshape(1, 2, 4, 1)
    mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES)
    spec = sharding.logical_to_spec(("layers", "embed", "qkv", "heads", "head_dim"), mesh=mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
    # 'batch' maps to (data, fsdp); data has size 1 here so only fsdp remains.
    assert sharding.logical_to_spec(("batch", "length"), mesh=mesh) == jax.sharding.PartitionSpec("fsdp", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",))


def test_release_jax_release_round_trip_is_bit_exact():
    w = dit_weights()
    model = dit.load(os.path.join(GOLDEN, "dit_tiny", "weights.safetensors"), "tiny")
    back = dit.export_release_state_dict(model)
    assert list(back) == list(release_schema(PRESETS["tiny"]))
    for name, ref in w.items():
        assert back[name].dtype == ref.dtype and np.array_equal(back[name], ref), name


def test_random_init_exports_to_the_schema_and_reloads_identically(tmp_path):
    from safetensors.numpy import save_file

    cfg = PRESETS["tiny"].replace(depth=3)
    model = dit.init(cfg, seed=3)
    sd = dit.export_release_state_dict(model)
    assert {k: v.shape for k, v in sd.items()} == release_schema(cfg)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    again = dit.export_release_state_dict(dit.load(path, cfg))
    assert all(np.array_equal(sd[k], again[k]) for k in sd)
