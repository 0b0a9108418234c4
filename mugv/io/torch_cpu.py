"""torch.distributed and megatron.core on a machine without CUDA, and a one-process world.

megatron.core allocates its communication and attention scratch buffers with
`device=torch.cuda.current_device()` (tensor_parallel.mappings, the sequence-parallel all-gather
in tensor_parallel.layers, parallel_state's global memory buffer used by the local
DotProductAttention) and calls `torch.cuda.synchronize()` around collectives. Without CUDA both
raise. Pointing `current_device` at the CPU and making `synchronize` a no-op is all it needs:
every other code path we use already honours `use_cpu_initialization=True`, gloo handles the
collectives, and CPU execution is synchronous anyway.

The patch (`apply`) is applied only when CUDA is absent, so it can never redirect work on a GPU
machine. Nothing else in megatron.core or torch is changed. It lives in the core because the
torch_dist reader (mugv/io/torch_dist.py) may need dist_checkpointing in a process that has no
Megatron run; the Megatron backend applies it in `mugv_megatron.parallel.state.setup`.

torch is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import socket

_ORIGINALS: dict[str, object] = {}


def _cpu_current_device():
    import torch

    return torch.device("cpu")


def _no_synchronize(device=None) -> None:
    return None


def is_applied() -> bool:
    return bool(_ORIGINALS)


def apply() -> bool:
    """Install the shim if CUDA is unavailable; returns whether it is (now) installed."""
    import torch

    if torch.cuda.is_available():
        return False
    if not _ORIGINALS:
        _ORIGINALS["current_device"] = torch.cuda.current_device
        _ORIGINALS["synchronize"] = torch.cuda.synchronize
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.synchronize = _no_synchronize
    return True


def remove() -> None:
    """Restore torch.cuda's own functions (for tests that want to see the unpatched state)."""
    import torch

    if _ORIGINALS:
        torch.cuda.current_device = _ORIGINALS.pop("current_device")
        torch.cuda.synchronize = _ORIGINALS.pop("synchronize")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    """The size of this process's torch.distributed world (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def one_process_group(what: str) -> None:
    """torch.distributed as a one-process gloo world on 127.0.0.1 (plus the CPU shim), for
    `what` (a sentence naming the work): dist_checkpointing's save and load are collectives
    over the default group. An existing world of one is used as it is; a bigger one is refused,
    since the other processes would not join the collective."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"{what} runs in a single process; this process is in a "
                f"torch.distributed world of {dist.get_world_size()}"
            )
        return
    apply()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
