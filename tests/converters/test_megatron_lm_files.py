"""Megatron-LM's own `--ckpt-format torch` files read safely.

A rank file Megatron-LM writes (`generate_state_dict`) holds, beside `model`: `args` (an
argparse.Namespace with enums such as `attention_backend`), `rng_state` (python, numpy, torch and
CUDA generator states: the numpy one pickles an ndarray through numpy's reconstructor),
`optimizer`, `opt_param_scheduler`, `checkpoint_version`, `iteration`; with Transformer Engine
each TE module's `_extra_state` (an `io.BytesIO` in TE 1.x, a uint8 tensor in TE 2.x, None for
the official ScaleShiftTable). The weights-only loader refused these files on the numpy state,
naming nothing. Now the pickle is replayed without calling any class outside the state-dict
allow-list (those objects are `Unread` stand-ins), so the weights are read and nothing in the
file runs; a file torch itself must read admits exactly the Megatron allow-list and names a
refused class.
"""

import argparse
import enum
import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from converters.convert import convert, verify
from converters.formats.megatron import LegacyReader
from mugv.io import megatron as save_dir
from mugv.io import torchzip
from tests.helpers import DIT_WEIGHTS

SENTINEL = "/tmp/mugv-test-megatron-lm-files-ran-code"


class AttnBackend(enum.Enum):
    """Stands for megatron.core's enum in Megatron-LM's `args` (not on any allow-list here)."""

    auto = 5


def _ran_code(path):
    open(path, "w").close()


class Payload:
    """An object whose unpickling would create a file: a reader that calls globals runs it."""

    def __reduce__(self):
        return (_ran_code, (SENTINEL,))


def megatron_lm_args(tp: int) -> argparse.Namespace:
    return argparse.Namespace(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        num_layers=2,
        hidden_size=144,
        num_attention_heads=2,
        attention_backend=AttnBackend.auto,
        params_dtype=torch.bfloat16,
        ckpt_format="torch",
    )


def megatron_lm_extras(tp: int, payload: bool = False) -> dict:
    """What Megatron-LM's `generate_state_dict` puts beside `model` in a legacy rank file."""
    rng = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
        "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)},
    }
    out = {
        "args": megatron_lm_args(tp),
        "checkpoint_version": 3.0,
        "iteration": 7,
        "rng_state": [rng],
        "optimizer": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}},
        "opt_param_scheduler": {"max_lr": 1e-5, "num_steps": 7},
    }
    if payload:
        out["unexpected"] = Payload()
    return out


def te_extra_states(model: dict) -> dict:
    """TE's extra state next to every TE linear: io.BytesIO (TE 1.x) or pickled-None bytes (TE 2.x)."""
    out = dict(model)
    for k in list(model):
        if k.endswith(".linear_qkv.weight") or k.endswith(".linear_proj.weight"):
            out[k[: -len("weight")] + "_extra_state"] = io.BytesIO(b"\x80\x02N.")
        elif k.endswith(".linear_fc1.weight"):
            te2 = torch.frombuffer(bytearray(pickle.dumps(None)), dtype=torch.uint8)
            out[k[: -len("weight")] + "_extra_state"] = te2
        elif k.endswith("scale_shift_table.bias"):
            out[k[: -len("bias")] + "_extra_state"] = None
    return out


def rewrite_as_megatron_lm(legacy_dir: str, tp: int, *, payload: bool = False, zip_format: bool = True) -> None:
    for d in save_dir.rank_dirs(save_dir.iter_dir(legacy_dir, 1)).values():
        f = os.path.join(d, save_dir.LEGACY_FILE)
        model = torch.load(f, weights_only=False)["model"]  # the test's own file
        state = {"model": te_extra_states({k: v.clone() for k, v in model.items()}), **megatron_lm_extras(tp, payload)}
        torch.save(state, f, _use_new_zipfile_serialization=zip_format)


@pytest.fixture(scope="module")
def legacy_tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    out = str(root / "tp2")
    convert(DIT_WEIGHTS, f"megatron-legacy:{out}", tp=2, workers=1)
    return out


def test_megatron_lm_rank_files_are_read_without_running_their_pickles(legacy_tp2, tmp_path):
    import shutil

    d = str(tmp_path / "mlm")
    shutil.copytree(legacy_tp2, d)
    rewrite_as_megatron_lm(d, tp=2, payload=True)
    if os.path.exists(SENTINEL):
        os.remove(SENTINEL)
    result = verify(DIT_WEIGHTS, f"megatron-legacy:{d}")
    assert result.equal, result.problems
    assert not os.path.exists(SENTINEL), "reading the checkpoint ran code from its pickle"
    reader = LegacyReader(d)
    f = save_dir.MegatronFile(reader.files[(0, 0)])
    state = f.obj
    # What is read: tensors, plain values, args; what stands in: the enum, numpy, BytesIO, the payload.
    assert state["iteration"] == 7 and state["args"].tensor_model_parallel_size == 2
    assert isinstance(state["args"].attention_backend, torchzip.Unread)
    assert state["args"].attention_backend.kind.endswith("AttnBackend")
    np_state = state["rng_state"][0]["np_rng_state"]
    assert isinstance(np_state, tuple) and isinstance(np_state[1], torchzip.Unread)
    assert np_state[1].kind == "numpy._core.multiarray._reconstruct"
    assert isinstance(state["unexpected"], torchzip.Unread)
    extra = [k for k in state["model"] if k.endswith("_extra_state")]
    assert extra and all(k in reader.skipped for k in extra)


def test_a_file_torch_must_read_admits_the_megatron_allow_list_and_names_what_it_refuses(legacy_tp2, tmp_path):
    import shutil

    d = str(tmp_path / "old")
    shutil.copytree(legacy_tp2, d)
    # The pre-zip format: only torch reads it, with Namespace, numpy's RNG state and BytesIO admitted.
    for rank in save_dir.rank_dirs(save_dir.iter_dir(d, 1)).values():
        f = os.path.join(rank, save_dir.LEGACY_FILE)
        state = torch.load(f, weights_only=False)  # the test's own file
        extras = megatron_lm_extras(2)
        extras["args"].attention_backend = "auto"  # a plain value: this file holds no unknown class
        torch.save({"model": state["model"], **extras}, f, _use_new_zipfile_serialization=False)
    import megatron.core  # noqa: F401 -- registers its safe globals for the process (Namespace, numpy, …)

    admitted = set(torch.serialization.get_safe_globals())
    assert verify(DIT_WEIGHTS, f"megatron-legacy:{d}").equal
    assert set(torch.serialization.get_safe_globals()) == admitted  # left as they were
    rewrite_as_megatron_lm(d, tp=2, zip_format=False)
    with pytest.raises(ValueError, match=r"mp_rank_00.*AttnBackend, which is not read"):
        LegacyReader(d)


def test_a_model_entry_that_is_not_a_tensor_is_named_with_its_class(legacy_tp2, tmp_path):
    import shutil

    d = str(tmp_path / "bad")
    shutil.copytree(legacy_tp2, d)
    f = os.path.join(save_dir.iter_dir(d, 1), "mp_rank_00", save_dir.LEGACY_FILE)
    state = torch.load(f, weights_only=False)  # the test's own file
    state["model"]["start_token"] = np.zeros(3)
    torch.save(state, f)
    with pytest.raises(ValueError, match=r"'start_token' is an unread numpy\._core\.multiarray\._reconstruct"):
        LegacyReader(d)
