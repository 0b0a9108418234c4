"""Megatron save directories: the names both variants share (docs/reference.md §4.6).

    <save dir>/latest_checkpointed_iteration.txt     the newest complete iteration ("release" or N)
    <save dir>/iter_XXXXXXX/                         one iteration, holding either
        .metadata, *.distcp, common.pt, metadata.json       torch_dist (mugv.io.torch_dist)
        mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt      legacy per-rank files (converters)

Both trainers and the converters name, find and publish iterations through these helpers; what
is inside an iteration belongs to the variant's own module.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import numpy as np

from mugv.config import DiTConfig
from mugv.io import torchzip
from mugv.io.atomic import write_text
from mugv.io.base import Entry, Reader, from_torch, numpy_dtype_of_torch

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
_ITER_DIR = re.compile(r"^iter_(\d+)$")

# An iteration the Megatron trainer is still writing: renamed to iter_XXXXXXX when complete.
PARTIAL_SUFFIX = ".tmp"

LEGACY_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?$")


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def iter_dir(save_dir: str, iteration: int | str) -> str:
    return os.path.join(save_dir, iter_dir_name(iteration))


def iteration_of(name: str) -> int | None:
    """N of an `iter_XXXXXXX` directory name, None for any other name (a partial one included)."""
    m = _ITER_DIR.match(name)
    return int(m.group(1)) if m else None


def is_partial_iter_dir(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIX) and iteration_of(name[: -len(PARTIAL_SUFFIX)]) is not None


def iterations(save_dir: str) -> list[int]:
    """The iterations present under a save directory, ascending."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(i for i in map(iteration_of, os.listdir(save_dir)) if i is not None)


def read_tracker(save_dir: str) -> int | str | None:
    """The iteration the tracker names ("release" or N), None without a tracker."""
    path = os.path.join(save_dir, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return "release" if text == "release" else int(text)


def write_tracker(save_dir: str, iteration: int) -> None:
    """Name `iteration` the newest (one rename: a reader sees the old or the new tracker)."""
    write_text(os.path.join(save_dir, TRACKER), str(iteration))


def is_torch_dist_dir(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "metadata.json")) and os.path.isfile(os.path.join(d, ".metadata"))


def is_legacy_dir(d: str) -> bool:
    return os.path.isdir(d) and any(_RANK_DIR.match(n) for n in os.listdir(d))


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_dirs(iteration_dir: str) -> dict[tuple[int, int], str]:
    """{(TP rank, PP rank): directory} of a legacy iteration directory."""
    out = {}
    for n in os.listdir(iteration_dir):
        m = _RANK_DIR.match(n)
        if m:
            out[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(iteration_dir, n)
    return out


def resolve_iteration_dir(path: str, iteration: int | None, marker) -> tuple[str, int | str]:
    """The iter_XXXXXXX directory of a save directory (via the tracker, or `iteration`), or
    `path` itself when `marker(path)` says it already is one."""
    if marker(path):
        base = os.path.basename(os.path.normpath(path))
        n = iteration_of(base)
        return path, (n if n is not None else base)
    if iteration is None:
        iteration = read_tracker(path)
        if iteration is None:
            raise FileNotFoundError(f"{path}: not a Megatron checkpoint (no {TRACKER}, and not an iteration directory)")
    d = iter_dir(path, iteration)
    if not marker(d):
        raise FileNotFoundError(f"{path}: iteration {iteration} has no checkpoint at {d}")
    return d, iteration


def detect_variant(path: str) -> str:
    """'torch_dist' or 'legacy' for a save directory or an iteration directory."""
    candidates = [path]
    tracked = read_tracker(path)
    if tracked is not None:
        candidates.append(iter_dir(path, tracked))
    for d in candidates:
        if is_torch_dist_dir(d):
            return "torch_dist"
        if is_legacy_dir(d):
            return "legacy"
    raise FileNotFoundError(f"{path}: neither a torch_dist nor a legacy Megatron checkpoint")


def safe_globals() -> list:
    """What a Megatron file may hold beside tensors and plain values, admitted (exactly these)
    when torch itself must read one: Megatron-LM's `args` (argparse.Namespace), the numpy RNG
    state of its `rng_state` (the array reconstructor, ndarray, dtype and the uint32 dtype class)
    and Transformer Engine's older `io.BytesIO` extra state."""
    import io

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    return [argparse.Namespace, _reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), io.BytesIO]


class MegatronFile:
    """A torch.save file of a Megatron checkpoint (a legacy rank file, a torch_dist `common.pt`),
    read without running pickled code: tensors (numpy views of the mapped file), plain values and
    `args` are read; any other object (Megatron-LM's enums in `args`, numpy RNG state, TE's
    `io.BytesIO` extra state, optimizer classes) is a `torchzip.Unread` naming its class. Files the
    torch-free parser does not take (pre-zip, compressed) go through torch's weights-only load
    with `safe_globals()`; a refused class is named in the error."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._zip = torchzip.TorchZipFile(path, unread_globals=True)
            self.obj = self._zip.obj
        except torchzip.NeedsTorch:
            self._zip = None
            self.obj = torchzip.load_torch_file(path, allow=safe_globals())

    def is_tensor(self, value) -> bool:
        if isinstance(value, torchzip.TensorRef):
            return True
        return self._zip is None and type(value).__module__.startswith("torch") and hasattr(value, "dtype")

    def entry(self, value) -> Entry:
        if isinstance(value, torchzip.TensorRef):
            return value.entry
        return Entry(value.shape, numpy_dtype_of_torch(value.dtype))

    def array(self, value, name: str) -> np.ndarray:
        """The tensor `value` of this file as a numpy array (a view of the mapped file)."""
        if isinstance(value, torchzip.TensorRef):
            return self._zip.array(value, name)
        return from_torch(value)

    def describe(self, value) -> str:
        """What a non-tensor value is, for errors ("an unread numpy.ndarray", "a str")."""
        if isinstance(value, torchzip.Unread):
            return f"an unread {value.kind}"
        return f"a {type(value).__name__}"


def stored_config(state) -> DiTConfig | None:
    """The model config our writers store in `common.pt` / a legacy rank file (`{"mugv":
    {"model": …}}`), None when the state holds none."""
    mugv = state.get("mugv") if isinstance(state, dict) else None
    model = mugv.get("model") if isinstance(mugv, dict) else None
    return DiTConfig.from_dict(model) if model else None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the processes that wrote a checkpoint were laid out (Megatron-LM compares TP and PP
    with its own run's to decide whether the per-rank RNG states apply)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def megatron_lm_args(
    config: DiTConfig,
    iteration: int,
    layout: Layout = Layout(),
    *,
    ckpt_format: str = "torch_dist",
    rng_saved: bool = False,
    consumed_train_samples: int = 0,
    seed: int | None = None,
) -> argparse.Namespace:
    """The `args` Megatron-LM saves, with the fields its loader and the official MUG-V trainer
    read back (megatron/training/checkpointing.py, core 0.14: `load_checkpoint` reads the TP/PP
    sizes unconditionally, `world_size`, `data_parallel_size`, `no_save_rng`, `no_save_optim`;
    `check_checkpoint_args` compares `num_layers`, `hidden_size`, `num_attention_heads`,
    `add_position_embedding`; the consumed-sample counters; `--use-checkpoint-args` copies the
    model fields), valued as the official launch scripts set them (docs/reference.md §4).

    `no_save_optim` is always True: our Adam moments sit under Megatron's per-parameter keys but
    not in its optimizer's layout, so Megatron-LM starts a fresh optimizer (resume with
    `--no-load-optim`, as its scripts always do). `rng_saved`: the checkpoint holds Megatron-LM's
    per-(PP, TP)-rank `rng_state` with CUDA states; without them `no_save_rng` makes it skip them.
    """
    c = config
    return argparse.Namespace(
        # parallel layout
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        data_parallel_size=layout.dp,
        world_size=layout.world_size,
        sequence_parallel=layout.sequence_parallel,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        # what the checkpoint holds
        ckpt_format=ckpt_format,
        use_dist_ckpt=ckpt_format != "torch",
        no_save_optim=True,
        no_save_rng=not rng_saved,
        iteration=iteration,
        consumed_train_samples=consumed_train_samples,
        skipped_train_samples=0,
        consumed_valid_samples=0,
        seed=seed,
        # the model (the official scripts' values; in_channels.. are MUG-V's own arguments)
        num_layers=c.depth,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.mlp_hidden_size,
        num_attention_heads=c.num_heads,
        num_query_groups=c.num_heads,
        group_query_attention=False,
        kv_channels=c.head_dim,
        seq_length=580000,
        max_position_embeddings=2320000,
        position_embedding_type="rope",
        add_position_embedding=True,
        rotary_base=int(c.rope_theta),
        rotary_percent=1.0,
        rotary_interleaved=True,
        add_bias_linear=True,
        add_qkv_bias=True,
        swiglu=False,
        squared_relu=False,
        normalization="RMSNorm",
        norm_epsilon=c.norm_eps,
        qk_layernorm=True,
        apply_layernorm_1p=False,
        apply_query_key_layer_scaling=False,
        untie_embeddings_and_output_weights=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tokenizer_type="NullTokenizer",
        vocab_file=None,
        padded_vocab_size=0,
        in_channels=c.in_channels,
        caption_channels=c.text_dim,
        model_max_length=c.max_text_tokens,
    )


# Megatron-LM's sharded-state-dict content metadata (`_build_sharded_state_dict_metadata`): layers
# stacked (`singleton_local_shards` False), as both our writers store them.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def common_state(config: DiTConfig, iteration: int, args: argparse.Namespace | None = None) -> dict:
    """The non-tensor entries every checkpoint of ours carries: what Megatron-LM reads (`args`,
    `iteration`, `checkpoint_version`, the content metadata; `args` by default those of a
    one-process weights-only checkpoint) and `mugv.model`, the config our readers take instead of
    detecting it."""
    if args is None:
        args = megatron_lm_args(config, iteration)
    return {
        "mugv": {"model": config.to_dict()},
        "args": args,
        "iteration": iteration,
        "checkpoint_version": CHECKPOINT_VERSION,
        "content_metadata": dict(CONTENT_METADATA),
    }


class MegatronReader(Reader):
    """What the Megatron readers share (torch_dist and the converters' legacy reader): the config
    the per-head regroup needs (heads and head dim), as set by the caller (`layout_config`), else
    the checkpoint's stored config, else detected from the shapes."""

    stored_config: DiTConfig | None = None
    layout_config: DiTConfig | None = None
    dir = ""  # the iteration directory read

    @property
    def location(self) -> str:
        return self.dir

    def _config_for_layout(self) -> DiTConfig:
        if self.layout_config is None:
            from mugv.schema import detect_config

            self.layout_config = self.stored_config or detect_config(self.entries())
        return self.layout_config
