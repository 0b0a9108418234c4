"""The null caption of a training checkpoint, carried to a release export as its sidecar.

Release weights hold no null caption (it is not a model weight; readers skip it), but sampling
without a negative prompt needs the one the model was trained with (mugv/null_text.py). When
`convert` writes release format it also writes `<weights>.null_text.safetensors` from:

  jax       state["null_text"] of the orbax training state
  megatron  `context_embedder.drop_emb` of a torch_dist training checkpoint (the Megatron
            trainer's `null_text`)
  release   the source's own sidecar, copied

Legacy Megatron (`mp_rank_*`) files and JAX checkpoints the converters wrote themselves (weights
only) hold none; nothing is written for them.
"""

from __future__ import annotations

import os

import numpy as np

from mugv import null_text as null_lib
from mugv.io import torch_dist

NULL_TEXT_STATE_KEY = "null_text"  # mugv_jax/train/step.py state
MEGATRON_NULL_TEXT_KEY = torch_dist.NULL_CAPTION_KEY  # mugv_megatron/train/checkpointing.py NULL_TEXT_KEY


def _jax_null_text(reader) -> np.ndarray | None:
    if NULL_TEXT_STATE_KEY not in reader.state_keys:
        return None
    from mugv.io.orbax import open_state_arrays

    (array,) = open_state_arrays(reader.state_dir, [NULL_TEXT_STATE_KEY]).values()
    return np.asarray(array.read().result())


def _megatron_null_text(reader) -> np.ndarray | None:
    return reader.read_stored(MEGATRON_NULL_TEXT_KEY)


def _is_torch_dist(reader) -> bool:
    from mugv.io.torch_dist import TorchDistReader

    return isinstance(reader, TorchDistReader)


def training_null_text(reader) -> tuple[np.ndarray, str] | None:
    """(null caption [max_text_tokens, D] float32, where it came from), or None when the source
    holds none. `reader` is an open converters reader."""
    if reader.format == "jax":
        null = _jax_null_text(reader)
        where = f"jax:{reader.step_dir} state[{NULL_TEXT_STATE_KEY!r}]"
    elif reader.format == "megatron" and _is_torch_dist(reader):
        null = _megatron_null_text(reader)
        where = f"megatron:{reader.dir} {MEGATRON_NULL_TEXT_KEY}"
    elif reader.format == "release":
        side = null_lib.sidecar_path(reader.path)
        if not os.path.isfile(side):
            return None
        return null_lib.load(side), side
    else:
        return None
    if null is None:
        return None
    return np.asarray(null, np.float32), where
