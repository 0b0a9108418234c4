"""Let megatron.core run on a machine without CUDA (tests, CPU debugging).

megatron.core allocates its communication and attention scratch buffers with
`device=torch.cuda.current_device()` (tensor_parallel.mappings, the sequence-parallel all-gather
in tensor_parallel.layers, parallel_state's global memory buffer used by the local
DotProductAttention) and calls `torch.cuda.synchronize()` around collectives. Without CUDA both
raise. Pointing `current_device` at the CPU and making `synchronize` a no-op is all it needs:
every other code path we use already honours `use_cpu_initialization=True`, gloo handles the
collectives, and CPU execution is synchronous anyway.

The patch is applied only when CUDA is absent, so it can never redirect work on a GPU machine.
Nothing else in megatron.core or torch is changed.
"""
from __future__ import annotations

import torch

_ORIGINALS: dict[str, object] = {}


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_synchronize(device=None) -> None:
    return None


def is_applied() -> bool:
    return bool(_ORIGINALS)


def apply() -> bool:
    """Install the shim if CUDA is unavailable; returns whether it is (now) installed."""
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
    if _ORIGINALS:
        torch.cuda.current_device = _ORIGINALS.pop("current_device")
        torch.cuda.synchronize = _ORIGINALS.pop("synchronize")
