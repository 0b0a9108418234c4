"""Build the Megatron MUG-DiT and load a release-layout checkpoint into it.

    model = mugv_megatron.model.build.load("dit.pt", "10b")
    out = model(x, timestep, y, mask=mask, x_mask=x_mask, fps=fps, frame_indice=frame_indice)

The checkpoint is checked strictly against the release schema of the config (every tensor
present, nothing extra, every shape right) before anything is loaded, then converted with
`converters.layouts.megatron` and cut into this rank's tensor-parallel shard.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from converters.layouts import megatron as layout
from converters.schema import check_state_dict_shapes, release_schema
from mugv.config import DiTConfig, get_config
from mugv_megatron.parallel import state as parallel


def read_release_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a .safetensors file or a torch-saved state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a flat state dict")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint {path}: entry {name!r} is a {type(value).__name__}, "
                             f"not a tensor")
    return dict(state)


def build_model(config: DiTConfig | str, *, params_dtype: torch.dtype = torch.float32,
                sequence_parallel: bool = False, use_te: bool | None = None,
                perform_initialization: bool = True, local_attention: str = "megatron"):
    """A MUG-DiT for the current megatron parallel state (set up a one-process one if none)."""
    from mugv_megatron.model.dit import MUGDiT
    from mugv_megatron.model.spec import get_layer_spec
    from mugv_megatron.model.transformer_config import make_transformer_config

    config = get_config(config)
    if not parallel.is_initialized():
        parallel.setup(1)
    tc = make_transformer_config(config, tensor_parallel_size=parallel.tensor_parallel_size(),
                                 sequence_parallel=sequence_parallel, params_dtype=params_dtype,
                                 perform_initialization=perform_initialization)
    model = MUGDiT(config, tc, get_layer_spec(use_te, local_attention=local_attention))
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def load_release_state(model, state: Mapping[str, torch.Tensor],
                       source: str = "state dict") -> None:
    """Strictly load a release-layout state dict into `model` (this rank's TP shard)."""
    config = model.dit_config
    check_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()},
                            release_schema(config), source)
    tp, rank = parallel.tensor_parallel_size(), parallel.tensor_parallel_rank()
    megatron_state = layout.release_state_to_megatron(dict(state), config)
    shards = dict(layout.iter_tp_shards(megatron_state, rank, tp))

    own = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if not k.endswith(layout.EXTRA_STATE_SUFFIX)}
    check_state_dict_shapes({k: tuple(v.shape) for k, v in shards.items()}, own,
                            f"{source} (as Megatron TP rank {rank}/{tp})")
    dtype = model.config.params_dtype
    model.load_state_dict({k: v.to(dtype) for k, v in shards.items()}, strict=True)


def load(path: str | os.PathLike, config: DiTConfig | str, *,
         params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
         use_te: bool | None = None):
    """The model of `config` with the release checkpoint at `path` loaded, in eval mode.

    Outside torch.distributed this initialises a one-process world; inside one (a launcher, or
    the TP tests' spawned workers) it uses megatron's existing parallel state.
    """
    config = get_config(config)
    state = read_release_checkpoint(path)
    # Fail on a mismatched checkpoint before building (and allocating) the model.
    check_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()},
                            release_schema(config), os.fspath(path))
    model = build_model(config, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                        use_te=use_te, perform_initialization=False)
    load_release_state(model, state, source=os.fspath(path))
    return model.eval()
