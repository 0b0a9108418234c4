"""Megatron-LM resumes from our torch_dist checkpoints (the converters' and the trainer's).

Megatron-LM (megatron/training/checkpointing.py of NVIDIA/Megatron-LM at core_v0.14.0, the base of
the official MUG-V trainer) is not a pip package, so `megatron_lm_load` below makes the calls its
`load_checkpoint` makes for a torch_dist checkpoint, in its order, read from that source:

1. `read_metadata`: the tracker's iteration (> -1); `_get_checkpoint_format`:
   `dist_checkpointing.check_is_distributed_checkpoint`.
2. Rank 0's `_load_base_checkpoint(rank0=True)`: `dist_checkpointing.load_common_state_dict`
   (torch.load under megatron.core's safe globals).
3. `state_dict['args'].tensor_model_parallel_size` / `.pipeline_model_parallel_size`
   (unconditional: a checkpoint without `args` is a KeyError), `world_size`, `data_parallel_size`,
   `no_save_rng`, `no_save_optim` (getattr).
4. The RNG state is requested when TP/PP match and neither `--no-load-rng` nor `args.no_save_rng`;
   `load_content_metadata(preloaded_state_dict=...)` picks the model's sharded layout.
5. `generate_state_dict`: the model's `sharded_state_dict` (here: the official MUGDiT's, built
   from the rules of its `MUGDiTBlock.sharded_state_dict` and megatron's `make_sharded_tensors_
   for_checkpoint`: stacked `decoder.layers.<sub>` [L, …] tensors with the TP split, bf16 as the
   official run keeps its parameters, and a `ShardedObject` per `_extra_state` of the TE or the
   local layer spec), the `rng_state` ShardedObject of (PP, TP) shape.
6. `dist_checkpointing.load(..., strict=args.dist_ckpt_strictness)`: Megatron-LM's default
   `assume_ok_unexpected` (anything requested and absent fails) and the official scripts'
   `log_all`.
7. `set_checkpoint_version(state_dict['checkpoint_version'])`, `iteration =
   state_dict['iteration']`, `check_checkpoint_args` (num_layers, hidden_size,
   num_attention_heads, add_position_embedding defaulting to True), the consumed-sample counters.
8. The RNG restore: `rng_state[0]`'s python, numpy and torch states (the CUDA ones need a GPU).

The official scripts resume with `--no-load-optim --no-load-rng`; our checkpoints also say
`no_save_optim` (our Adam state is not in Megatron's optimizer layout). Runs at TP 1 in this
process and TP 2 in two spawned gloo processes.
"""

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from converters.convert import convert
from mugv.config import get_config
from mugv.io import torch_cpu
from mugv.io.torch_dist import LOCAL_LAYER_MODULES, TE_LAYER_MODULES, TorchDistReader
from mugv.layouts import megatron as mlayout
from mugv.training import ObjectiveConfig, OptimConfig
from tests.helpers import DIT_WEIGHTS, dit_weights

TINY = get_config("tiny")
FINAL_EXTRA = "final_layer.scale_shift_table._extra_state"
# What the official run passes that the loader looks at.
RUN_ARGS = dict(num_layers=TINY.depth, hidden_size=TINY.hidden_size, num_attention_heads=TINY.num_heads)


def official_requests(config, spec: str, tp_rank: int, tp: int, *, with_rng: bool):
    """The sharded state dict the official MUGDiT (bf16, TE or local layer spec) asks a torch_dist
    load for on TP rank `tp_rank` of `tp` (data-parallel rank 0, one pipeline stage)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    depth, model = config.depth, {}
    for mname, shape in mlayout.megatron_schema(config).items():
        layer, sub = mlayout.split_layer(mname)
        rule = mlayout.tp_split_rule(mname)
        local = list(shape)
        offsets, prepend = [], 0
        if layer is not None:
            offsets.append((0, layer, depth))
            prepend = 1
        if rule != "replicated":
            axis = 0 if rule == "column" else 1
            local[axis] //= tp
            offsets.append((axis + prepend, tp_rank, tp))
        key = mname if layer is None else mlayout.LAYER_PREFIX + sub
        # megatron: TP-split tensors are not replicated over TP, the others are.
        replica = (0, 0 if rule != "replicated" else tp_rank, 0)
        model[mname] = ShardedTensor.from_rank_offsets(
            key, torch.empty(local, dtype=torch.bfloat16), *offsets, replica_id=replica, prepend_axis_num=prepend
        )
    modules = TE_LAYER_MODULES if spec == "te" else LOCAL_LAYER_MODULES
    for layer in range(depth):
        for module in modules:
            key = f"{mlayout.LAYER_PREFIX}{module}._extra_state"
            model[f"{key}/{layer}"] = ShardedObject(key, None, (depth,), (layer,), replica_id=(0, tp_rank, 0))
    model[FINAL_EXTRA] = ShardedObject(FINAL_EXTRA, None, (1,), (0,), replica_id=(0, tp_rank, 0))
    out = {"model": model}
    if with_rng:
        out["rng_state"] = ShardedObject("rng_state", None, (1, tp), (0, tp_rank), replica_id=0)
    return out


def megatron_lm_load(load_dir: str, spec: str, tp_rank: int, tp: int, strict: str, *, no_load_rng: bool = True):
    """Megatron-LM's `load_checkpoint` on a torch_dist checkpoint (module docstring, steps 1-8)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    with open(os.path.join(load_dir, "latest_checkpointed_iteration.txt")) as f:
        iteration = int(f.read().strip())
    assert iteration > -1
    ckpt = os.path.join(load_dir, f"iter_{iteration:07d}")
    assert dist_checkpointing.check_is_distributed_checkpoint(ckpt)
    common = dist_checkpointing.load_common_state_dict(ckpt)
    ckpt_tp_pp = (common["args"].tensor_model_parallel_size, common["args"].pipeline_model_parallel_size)
    getattr(common["args"], "world_size", 0), getattr(common["args"], "data_parallel_size", 0)
    with_rng = ckpt_tp_pp == (tp, 1) and not no_load_rng and not getattr(common["args"], "no_save_rng", False)
    assert getattr(common["args"], "no_save_optim", False), "our optimizer state is not Megatron's"
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    assert not (metadata or {}).get("singleton_local_shards", False)  # stacked layers
    requests = official_requests(TINY, spec, tp_rank, tp, with_rng=with_rng)
    loaded = dist_checkpointing.load(requests, ckpt, TorchDistLoadShardedStrategy(), strict=strict)
    assert loaded["checkpoint_version"] >= 3.0
    args = loaded["args"]
    for name, value in RUN_ARGS.items():
        assert getattr(args, name) == value, name
    assert getattr(args, "add_position_embedding", True) is True
    for name in ("consumed_train_samples", "skipped_train_samples", "consumed_valid_samples"):
        assert isinstance(getattr(args, name, 0), int)
    if with_rng:
        rng = loaded["rng_state"][0]
        random.setstate(rng["random_rng_state"])
        np.random.set_state(rng["np_rng_state"])
        torch.set_rng_state(rng["torch_rng_state"])
    return loaded, loaded["iteration"]


def expected_shards(release: dict, tp_rank: int, tp: int) -> dict:
    """{megatron name: this rank's bf16 shard} of release-layout weights (via the layout rules)."""
    out = {}
    for name, array in release.items():
        for mname, full in mlayout.release_to_megatron(name, torch.from_numpy(np.asarray(array)), TINY):
            out[mname] = mlayout.tp_shard(mname, full, tp_rank, tp).to(torch.bfloat16)
    return out


def check(load_dir: str, release: dict, tp_rank: int, tp: int, iteration: int) -> list[str]:
    """Every spec and strictness: the loaded weights are the checkpoint's (rounded to bf16 like
    the official parameters), the placeholders None; returns the problems found."""
    problems = []
    want = expected_shards(release, tp_rank, tp)
    for spec in ("te", "local"):
        for strict in ("assume_ok_unexpected", "log_all"):
            loaded, it = megatron_lm_load(load_dir, spec, tp_rank, tp, strict)
            model = loaded["model"]
            if it != iteration:
                problems.append(f"{spec}/{strict}: iteration {it}, expected {iteration}")
            for mname, w in want.items():
                if not torch.equal(model[mname], w):
                    problems.append(f"{spec}/{strict}: {mname} differs")
            extra = [k for k in model if "_extra_state" in k]
            if not extra or any(model[k] is not None for k in extra):
                problems.append(f"{spec}/{strict}: extra states {extra[:3]}")
    return problems


def _tp2(rank: int, port: int, cases: list, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch_cpu.apply()
    problems = []
    for load_dir, release_file, iteration in cases:
        release = dict(np.load(release_file))
        problems += [f"{load_dir}: {p}" for p in check(load_dir, release, rank, 2, iteration)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(problems, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(save dir, release-layout weights, iteration) of a converter output and of a Megatron
    trainer checkpoint (TP 1, one step trained)."""
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train import checkpointing
    from mugv_megatron.train.step import Trainer

    root = tmp_path_factory.mktemp("mlm_resume")
    converted = str(root / "converted")
    convert(DIT_WEIGHTS, f"megatron:{converted}@5", workers=1)
    parallel.setup(1)
    tr = Trainer(TINY, OptimConfig(learning_rate=1e-3), ObjectiveConfig(), seed=3, use_megatron_optimizer=False)
    tr.step = 2
    trained = str(root / "trainer")
    checkpointing.save(trained, tr, {"position": 0})
    trained_weights = dict(TorchDistReader(trained).items())
    return [(converted, dit_weights(), 5), (trained, trained_weights, 2)]


def test_megatron_lm_resumes_at_tp1_with_either_layer_spec(checkpoints):
    for load_dir, release, iteration in checkpoints:
        assert check(load_dir, release, 0, 1, iteration) == []


def test_megatron_lm_resumes_at_tp2_with_either_layer_spec(checkpoints, tmp_path):
    cases = []
    for i, (load_dir, release, iteration) in enumerate(checkpoints):
        np.savez(tmp_path / f"{i}.npz", **release)
        cases.append((load_dir, str(tmp_path / f"{i}.npz"), iteration))
    mp.spawn(_tp2, args=(torch_cpu.free_port(), cases, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.load(open(tmp_path / f"rank{rank}.json")) == [], rank


def test_the_trainer_saves_megatron_lm_rng_states_and_layout(checkpoints):
    """The trainer's `rng_state` is Megatron-LM's (a list per (PP, TP) rank with the python, numpy
    and torch states); without CUDA states `args.no_save_rng` tells Megatron-LM to skip it."""
    trained = checkpoints[1][0]
    loaded, _ = megatron_lm_load(trained, "te", 0, 1, "assume_ok_unexpected", no_load_rng=True)
    args = loaded["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.world_size) == (1, 1, 1)
    assert args.no_save_rng is (not torch.cuda.is_available()) and args.ckpt_format == "torch_dist"
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ckpt = os.path.join(trained, "iter_0000002")
    rng = dist_checkpointing.load({"r": ShardedObject("rng_state", None, (1, 1), (0, 0), replica_id=0)}, ckpt)["r"]
    assert isinstance(rng, list) and {"random_rng_state", "np_rng_state", "torch_rng_state"} <= set(rng[0])
    np.random.set_state(rng[0]["np_rng_state"])
    torch.set_rng_state(rng[0]["torch_rng_state"])


def test_a_checkpoint_without_args_is_what_megatron_lm_refused(checkpoints, tmp_path):
    """Before: common.pt had no `args`, and Megatron-LM's loader stopped at step 3."""
    import shutil

    src = checkpoints[0][0]
    d = str(tmp_path / "no_args")
    shutil.copytree(src, d)
    common = os.path.join(d, "iter_0000005", "common.pt")
    state = torch.load(common, weights_only=False)  # the test's own file
    del state["args"]
    torch.save(state, common)
    with pytest.raises(KeyError, match="args"):
        megatron_lm_load(d, "te", 0, 1, "assume_ok_unexpected")
