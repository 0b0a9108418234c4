"""Process-group and megatron parallel-state set-up, for one process or spawned TP/CP/PP groups.

megatron.core's layers read the tensor-parallel group from `parallel_state`, so a model can only
be built after `initialize_model_parallel`. `setup` does the whole sequence: the CPU shim
(`mugv.io.torch_cpu`) when CUDA is absent, `torch.distributed` (gloo on CPU, NCCL on GPU) on
127.0.0.1, megatron's groups (tensor, context and pipeline parallel; the rest of the world is
data parallel), and the RNG tracker.
"""

from __future__ import annotations

import datetime
import math

import torch
import torch.distributed as dist

from mugv.io import torch_cpu

DEFAULT_SEED = 1234


def _parallel_state():
    from megatron.core import parallel_state

    return parallel_state


def is_initialized() -> bool:
    return _parallel_state().model_parallel_is_initialized()


def tensor_parallel_size() -> int:
    return _parallel_state().get_tensor_model_parallel_world_size()


def tensor_parallel_rank() -> int:
    return _parallel_state().get_tensor_model_parallel_rank()


def context_parallel_size() -> int:
    return _parallel_state().get_context_parallel_world_size()


def context_parallel_rank() -> int:
    return _parallel_state().get_context_parallel_rank()


def pipeline_parallel_size() -> int:
    return _parallel_state().get_pipeline_model_parallel_world_size()


def pipeline_parallel_rank() -> int:
    return _parallel_state().get_pipeline_model_parallel_rank()


def setup(
    tensor_parallel_size: int = 1,
    *,
    rank: int = 0,
    world_size: int | None = None,
    master_port: int | None = None,
    seed: int = DEFAULT_SEED,
    timeout: datetime.timedelta | None = None,
    context_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> None:
    """Initialise torch.distributed (if needed) and megatron's parallel state.

    With the defaults this makes a one-process world, which is what `mugv_megatron.model.build.load`
    uses outside a launcher. Spawned workers pass their rank, the world size and a shared port
    (and a short `timeout`, so that a collective mismatch fails instead of hanging). The world
    size defaults to TP × CP × PP (no data parallelism); a larger world adds data-parallel
    replicas.
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch_cpu.apply()
    sizes = {"tensor": tensor_parallel_size, "context": context_parallel_size, "pipeline": pipeline_parallel_size}
    for kind, size in sizes.items():
        if size < 1:
            raise ValueError(f"setup: {kind}-parallel size must be >= 1, got {size}")
    model_parallel = tensor_parallel_size * context_parallel_size * pipeline_parallel_size
    world_size = model_parallel if world_size is None else world_size
    if world_size % model_parallel:
        raise ValueError(
            f"setup: world size {world_size} is not a multiple of TP {tensor_parallel_size} × "
            f"CP {context_parallel_size} × PP {pipeline_parallel_size} = {model_parallel}"
        )
    if not dist.is_initialized():
        if master_port is None:
            if world_size != 1:
                raise ValueError("setup: a multi-process world needs an explicit master_port")
            master_port = torch_cpu.free_port()
        if on_gpu:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            init_method=f"tcp://127.0.0.1:{master_port}",
            rank=rank,
            world_size=world_size,
            **({} if timeout is None else {"timeout": timeout}),
        )
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        have = {
            "tensor": ps.get_tensor_model_parallel_world_size(),
            "context": ps.get_context_parallel_world_size(),
            "pipeline": ps.get_pipeline_model_parallel_world_size(),
        }
        for kind, size in sizes.items():
            if have[kind] != size:
                raise RuntimeError(
                    f"megatron parallel state is already initialised with {kind}-parallel size {have[kind]}, not {size}"
                )
        return
    minutes = 30 if timeout is None else max(1, math.ceil(timeout.total_seconds() / 60))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=minutes,
    )
    from megatron.core import tensor_parallel

    # Without CUDA the training RNG tracker cannot snapshot CUDA generator states; the
    # inference tracker's fork() is a no-op, which is all a dropout-free model needs.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not on_gpu)


def teardown() -> None:
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
