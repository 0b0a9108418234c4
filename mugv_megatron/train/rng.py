"""The step draws of `mugv.rng` in torch, on the training device.

The same Threefry-2x32 as the numpy reference (and JAX), on int64 tensors holding 32-bit words,
so the bits agree exactly and a rank draws its own rows only, where it trains."""

from __future__ import annotations

import math

import torch

from mugv import rng as ref

_MASK = 0xFFFFFFFF


def threefry2x32(k0: int, k1: int, c0: torch.Tensor, c1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k0, k1 = int(k0) & _MASK, int(k1) & _MASK
    ks = (k0, k1, k0 ^ k1 ^ ref.KEY_PARITY)
    x0, x1 = (c0 + ks[0]) & _MASK, (c1 + ks[1]) & _MASK
    for group in range(5):
        for r in ref.ROTATIONS[group % 2]:
            x0 = (x0 + x1) & _MASK
            x1 = ((x1 << r) | (x1 >> (32 - r))) & _MASK
            x1 = x1 ^ x0
        x0 = (x0 + ks[(group + 1) % 3]) & _MASK
        x1 = (x1 + ks[(group + 2) % 3] + group + 1) & _MASK
    return x0, x1


def bits(seed: int, step: int, tag: int, rows: torch.Tensor, elements: int):
    """Output words [len(rows), elements] for global sample indices `rows` (int64 tensor)."""
    ref.check_rows(rows.cpu().numpy() if rows.numel() else [])
    c0 = ((tag << ref.ROW_BITS) | rows).reshape(-1, 1)
    c1 = torch.arange(elements, dtype=torch.int64, device=rows.device).reshape(1, -1)
    c0, c1 = torch.broadcast_tensors(c0, c1)
    return threefry2x32(seed, step, c0, c1)


def uniform(x: torch.Tensor) -> torch.Tensor:
    return ((x >> 9).float() + 0.5) * (2.0**-23)


def normals(seed: int, step: int, tag: int, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape) if shape else 1
    x0, x1 = bits(seed, step, tag, rows, n)
    z = torch.sqrt(-2.0 * torch.log(uniform(x0))) * torch.cos(2.0 * math.pi * uniform(x1))
    return z.reshape(len(rows), *shape)


def uniforms(seed: int, step: int, tag: int, rows: torch.Tensor) -> torch.Tensor:
    return uniform(bits(seed, step, tag, rows, 1)[0])[:, 0]


def randints(seed: int, step: int, tag: int, rows: torch.Tensor, n: int) -> torch.Tensor:
    if not 0 < n <= ref.MAX_RANGE:
        raise ValueError(f"randint range must be in 1..{ref.MAX_RANGE}, got {n}")
    return (((bits(seed, step, tag, rows, 1)[0] >> 8) * n) >> 24)[:, 0]
