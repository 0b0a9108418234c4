"""Build the Megatron MUG-DiT and load a release-layout checkpoint into it.

    model = mugv_megatron.model.build.load("dit.pt", "10b")
    out = model(x, timestep, y, mask=mask, x_mask=x_mask, fps=fps, frame_indice=frame_indice)

The checkpoint is read through the project's one release reader (`mugv.io.release`: memory-mapped,
`.pt`, safetensors or HF shards) and checked strictly against the release schema of the config
(every tensor present, nothing extra, every shape right) before anything is loaded; then each
tensor in turn is converted with `mugv.layouts.megatron`, cut to this rank's tensor-parallel
shard and copied into the model, so the host holds about one tensor beyond the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from mugv.config import DiTConfig, get_config
from mugv.io.base import to_torch
from mugv.io.release import ReleaseReader
from mugv.layouts import megatron as layout
from mugv.schema import check_state_dict_shapes, release_schema
from mugv_megatron.parallel import state as parallel


def read_release_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} of a release checkpoint (.pt, .safetensors or HF shards).

    The tensors are views of the memory-mapped file (copy-on-write): nothing is read until a
    tensor is used, and what is read is page cache, not this process's memory.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with ReleaseReader(path) as reader:
        return {name: to_torch(reader.get(name)) for name in reader.entries()}


def build_model(
    config: DiTConfig | str,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    use_te: bool | None = None,
    perform_initialization: bool = True,
    local_attention: str = "megatron",
):
    """A MUG-DiT for the current megatron parallel state (set up a one-process one if none)."""
    from mugv_megatron.model.dit import MUGDiT
    from mugv_megatron.model.spec import get_layer_spec
    from mugv_megatron.model.transformer_config import make_transformer_config

    config = get_config(config)
    if not parallel.is_initialized():
        parallel.setup(1)
    tc = make_transformer_config(
        config,
        tensor_parallel_size=parallel.tensor_parallel_size(),
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        perform_initialization=perform_initialization,
    )
    model = MUGDiT(config, tc, get_layer_spec(use_te, local_attention=local_attention))
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def load_release_state(model, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Strictly load a release-layout state dict into `model` (this rank's TP shard).

    Names and shapes are checked (against the release schema, then this rank's parameters) before
    any value is copied; values then go one tensor at a time.
    """
    config = model.dit_config
    check_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()}, release_schema(config), source)
    tp, rank = parallel.tensor_parallel_size(), parallel.tensor_parallel_rank()
    own = {
        k: v
        for k, v in model.state_dict().items()
        if not k.endswith(layout.EXTRA_STATE_SUFFIX) and ".lora_" not in k  # adapters: mugv_megatron/model/lora.py
    }
    # The same maps on shape-only tensors give every shard's shape without touching the data.
    shard_shapes = {
        k: tuple(v.shape)
        for name, t in state.items()
        for k, v in _rank_tensors(name, torch.empty(t.shape, device="meta"), config, rank, tp)
    }
    check_state_dict_shapes(
        shard_shapes, {k: tuple(v.shape) for k, v in own.items()}, f"{source} (as Megatron TP rank {rank}/{tp})"
    )
    with torch.no_grad():
        for name, tensor in state.items():
            for key, shard in _rank_tensors(name, tensor, config, rank, tp):
                own[key].copy_(shard)


def _rank_tensors(name: str, tensor: torch.Tensor, config: DiTConfig, rank: int, tp: int):
    for mname, full in layout.release_to_megatron(name, tensor, config):
        yield mname, layout.tp_shard(mname, full, rank, tp)


def load(
    path: str | os.PathLike,
    config: DiTConfig | str,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    use_te: bool | None = None,
):
    """The model of `config` with the release checkpoint at `path` loaded, in eval mode.

    Outside torch.distributed this initialises a one-process world; inside one (a launcher, or
    the TP tests' spawned workers) it uses megatron's existing parallel state.
    """
    config = get_config(config)
    # Memory-mapped: the shape check below reads no tensor data.
    state = read_release_checkpoint(path)
    # Fail on a mismatched checkpoint before building (and allocating) the model.
    check_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()}, release_schema(config), os.fspath(path))
    model = build_model(
        config,
        params_dtype=params_dtype,
        sequence_parallel=sequence_parallel,
        use_te=use_te,
        perform_initialization=False,
    )
    load_release_state(model, state, source=os.fspath(path))
    return model.eval()
