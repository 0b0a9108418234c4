"""`mugv.io.weights.open_weights`, what both trainers' `config.init_from` reads: the EMA of a
Megatron and of a JAX training checkpoint equal to what was saved, release files refuse "ema",
and torch_dist is read without a process group: TP-sharded chunks are assembled from the mapped
files, and two ranks of one world read it at once."""

import os
import re

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from converters.convert import convert
from mugv.config import get_config
from mugv.io import torch_cpu
from mugv.io.torch_dist import TorchDistReader
from mugv.io.weights import open_weights
from mugv.layouts import jax as jax_layout
from mugv.layouts import megatron as mlayout
from mugv.layouts.jax import unflatten
from mugv.schema import release_schema
from mugv.training import ObjectiveConfig, OptimConfig
from tests.helpers import DIT_WEIGHTS, dit_weights

TINY = get_config("tiny")
TP = 2


def _equal(got: dict, want: dict):
    assert list(got) == list(release_schema(TINY))
    assert set(want) == set(got)
    for name, value in want.items():
        assert got[name].dtype == np.asarray(value).dtype, name
        assert np.array_equal(got[name], np.asarray(value)), name


@pytest.fixture(scope="module")
def release_weights():
    return dit_weights()


def test_megatron_training_checkpoint_ema(tmp_path):
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train import checkpointing
    from mugv_megatron.train.step import Trainer

    parallel.setup(1)
    tr = Trainer(TINY, OptimConfig(), ObjectiveConfig(), seed=5, use_megatron_optimizer=False)
    with torch.no_grad():
        for i, t in enumerate(tr.ema.shadow.values()):
            t.mul_(0.25).add_(2.0 + i)  # unlike the weights everywhere
    checkpointing.save(str(tmp_path / "ck"), tr, {"position": 0})
    for weights, tensors in (("ema", tr.ema.shadow), ("raw", dict(tr.module.named_parameters()))):
        want = mlayout.megatron_state_to_release({n: t.detach().numpy() for n, t in tensors.items()}, TINY)
        _equal(open_weights(f"megatron:{tmp_path}/ck", model=TINY, weights=weights), want)
    # An unprefixed save directory is recognised as Megatron.
    _equal(
        open_weights(f"{tmp_path}/ck", model=TINY, weights="ema"),
        mlayout.megatron_state_to_release({n: t.numpy() for n, t in tr.ema.shadow.items()}, TINY),
    )


def test_jax_training_checkpoint_ema(tmp_path, release_weights):
    from mugv_jax.train.checkpointing import Checkpointer

    raw = {n: np.asarray(a, np.float32) for n, a in release_weights.items()}
    ema = {n: (a * 0.5 + 1.0).astype(np.float32) for n, a in raw.items()}

    def jax_params(state):
        flat = {}
        for name, array in state.items():
            path, layer, a = jax_layout.release_to_jax(name, array, TINY)
            if layer is None:
                flat[path] = a
            else:
                flat.setdefault(path, np.empty(jax_layout.jax_param_shapes(TINY)[path], np.float32))[layer] = a
        return unflatten(flat)

    ck = Checkpointer(str(tmp_path / "checkpoints"), use_async=False)
    ck.save(7, {"params": jax_params(raw), "ema": jax_params(ema)}, {"position": 0}, {"model": TINY.to_dict()})
    ck.close()
    _equal(open_weights(f"jax:{tmp_path}/checkpoints@7", model=TINY, weights="ema"), ema)
    _equal(open_weights(f"jax:{tmp_path}", model=TINY), raw)  # the workdir, newest step
    _equal(open_weights(str(tmp_path / "checkpoints"), model=TINY, weights="ema"), ema)
    with pytest.raises(FileNotFoundError, match=r"no step 8 \(steps present: \[7\]\)"):
        open_weights(f"jax:{tmp_path}/checkpoints@8", model=TINY)


def test_release_file_refuses_ema_and_wrong_models(release_weights):
    _equal(open_weights(DIT_WEIGHTS, model=TINY), release_weights)
    _equal(open_weights(f"release:{DIT_WEIGHTS}", model="tiny"), release_weights)
    with pytest.raises(
        ValueError,
        match=r"weights.safetensors is a release checkpoint.*"
        r"config.init_weights='ema' needs a training checkpoint",
    ):
        open_weights(DIT_WEIGHTS, model=TINY, weights="ema")
    with pytest.raises(ValueError, match=r"config.init_weights must be 'raw' or 'ema', got 'EMA'"):
        open_weights(DIT_WEIGHTS, model=TINY, weights="EMA")
    deeper = get_config("tiny", depth=TINY.depth + 1)
    with pytest.raises(
        ValueError,
        match=rf"weights.safetensors does not match the model schema:\n"
        rf"  missing tensors \(\d+\): blocks.{TINY.depth}.",
    ):
        open_weights(DIT_WEIGHTS, model=deeper)


# ---------------------------------------------------------------------------------------------
# torch_dist saved by TP ranks: every tensor split in chunks


def _save_tp_sharded(directory: str, release: dict) -> None:
    """A torch_dist checkpoint whose column/row-parallel tensors are stored as TP chunks (what a
    TP 2 trainer run saves), written from this one process."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    torch_cpu.one_process_group("the test's TP-sharded save")
    full = mlayout.release_state_to_megatron({n: torch.from_numpy(a.copy()) for n, a in release.items()}, TINY)
    sd = {}
    for mname, tensor in full.items():
        layer, key = None, mname
        if mname.startswith(mlayout.LAYER_PREFIX):
            layer, suffix = mname[len(mlayout.LAYER_PREFIX) :].split(".", 1)
            layer, key = int(layer), mlayout.LAYER_PREFIX + suffix
        # As mugv_megatron/train/checkpointing.py shards them: a layer at its index of a
        # prepended axis, column-parallel tensors split along dim 0, row-parallel along dim 1.
        offsets = [(0, layer, TINY.depth)] if layer is not None else []
        prepend = 1 if layer is not None else 0
        rule = mlayout.tp_split_rule(mname)
        for r in range(TP) if rule != "replicated" else [None]:
            shard = tensor if r is None else mlayout.tp_shard(mname, tensor, r, TP).contiguous()
            split = [] if r is None else [((0 if rule == "column" else 1) + prepend, r, TP)]
            sd[f"{mname}/{r}"] = ShardedTensor.from_rank_offsets(
                key, shard, *offsets, *split, replica_id=0, prepend_axis_num=prepend
            )
    os.makedirs(os.path.join(directory, "iter_0000003"))
    dist_checkpointing.save(
        sd, os.path.join(directory, "iter_0000003"), sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1)
    )
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("3")


@pytest.fixture(scope="module")
def tp_sharded(tmp_path_factory, release_weights):
    d = str(tmp_path_factory.mktemp("tp_sharded") / "ck")
    _save_tp_sharded(d, release_weights)
    return d


def test_tp_sharded_chunks_are_read_from_the_mapped_files(tp_sharded, release_weights):
    reader = TorchDistReader(tp_sharded)
    key = "decoder.layers.mlp.linear_fc1.weight"
    assert len(reader._chunks[key].chunks) == TINY.depth * TP  # really split: a layer is 2 chunks
    assert reader.describe()["read"] == "memory-mapped chunks"
    _equal(open_weights(f"megatron:{tp_sharded}", model=TINY), release_weights)


def test_dist_checkpointing_fallback_is_refused_in_a_multi_process_world(tp_sharded, monkeypatch):
    """Chunks only dist_checkpointing reads (storage transforms; here every tensor, by patching
    the index of mapped reads) cannot be loaded by one rank of a bigger world alone: the error
    names the checkpoint and the conversion that avoids it."""
    monkeypatch.setattr(TorchDistReader, "_direct_index", lambda self: {})
    monkeypatch.setattr(torch_cpu, "world_size", lambda: 4)
    with pytest.raises(
        RuntimeError,
        match=r"iter_0000003: tensor .* the other 3 processes of this run do "
        r"not join.* python -m converters convert --src megatron:" + re.escape(tp_sharded) + r"@3 --dst release:",
    ):
        open_weights(f"megatron:{tp_sharded}", model=TINY)


def _two_ranks(rank: int, port: int, directories: list[str], out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for i, d in enumerate(directories):
        state = open_weights(f"megatron:{d}", model=TINY)
        np.savez(os.path.join(out, f"{i}.rank{rank}.npz"), **state)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_every_rank_of_a_world_reads_torch_dist(tp_sharded, release_weights, tmp_path):
    """init_from runs on every rank of a Megatron run: no collective, so both ranks read alone."""
    convert(DIT_WEIGHTS, f"megatron:{tmp_path}/whole")
    directories = [tp_sharded, f"{tmp_path}/whole"]
    mp.spawn(_two_ranks, args=(torch_cpu.free_port(), directories, str(tmp_path)), nprocs=2, join=True)
    for i in range(len(directories)):
        for rank in range(2):
            got = dict(np.load(tmp_path / f"{i}.rank{rank}.npz"))
            _equal({n: got[n] for n in release_schema(TINY)}, release_weights)
