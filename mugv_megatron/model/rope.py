"""3D rotary position embedding over (h, w, t), interleaved pairs (docs/reference.md §1.5).

Each head of width d is split into three equal parts of d/6 rotation pairs: dims [0, d/3) rotate
with the patch row, [d/3, 2d/3) with the patch column, [2d/3, d) with the temporal position.
Pair j of an axis uses angle pos·θ^(-j/P), P = d/6. "Interleaved" means pair j is the adjacent
dims (2j, 2j+1), which is also how the release's complex multiplication pairs them.

The angle table is built in float64 and applied in at least float32 (docs/reference.md §3.4).
"""

from __future__ import annotations

import torch

from mugv.config import DiTConfig


def _axis_inv_freq(config: DiTConfig) -> torch.Tensor:
    pairs = config.rope_pairs_per_axis
    k = torch.arange(pairs, dtype=torch.float64)
    return config.rope_theta ** (-k / pairs)


def token_positions(
    grid: tuple[int, int, int], frame_indice: torch.Tensor, config: DiTConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, col, time) positions of [start, video tokens in (t, h, w) order, end], each [S, B].

    The start token sits at row 0, column 0 and time frame_indice[:, 0]; the end token at the
    last row and column and time frame_indice[:, -1]; video frame i at time frame_indice[:, i+1].
    """
    t, h, w = grid
    batch = frame_indice.shape[0]
    if tuple(frame_indice.shape) != (batch, t + 2):
        raise ValueError(
            f"frame_indice must have shape [B, T+2] = [{batch}, {t + 2}] for {t} latent frames, "
            f"got {list(frame_indice.shape)}"
        )
    if h > config.rope_space_positions or w > config.rope_space_positions:
        raise ValueError(f"patch grid {h}x{w} exceeds the {config.rope_space_positions} RoPE space positions")
    # Out-of-range temporal positions are clamped, as the reference's table lookup does.
    frames = frame_indice.to(torch.int64).clamp(0, config.rope_time_positions - 1)
    rows = torch.arange(h).view(1, h, 1).expand(t, h, w).reshape(-1)
    cols = torch.arange(w).view(1, 1, w).expand(t, h, w).reshape(-1)
    frame_of_token = torch.arange(t).view(t, 1, 1).expand(t, h, w).reshape(-1)

    row = torch.cat([torch.zeros(1, dtype=torch.int64), rows, torch.tensor([h - 1])])
    col = torch.cat([torch.zeros(1, dtype=torch.int64), cols, torch.tensor([w - 1])])
    row = row.view(-1, 1).expand(-1, batch)
    col = col.view(-1, 1).expand(-1, batch)
    time = torch.cat([frames[:, :1], frames[:, 1 + frame_of_token], frames[:, -1:]], dim=1).t()
    return row, col, time


def rope_angles(
    grid: tuple[int, int, int], frame_indice: torch.Tensor, config: DiTConfig, total_tokens: int | None = None
) -> torch.Tensor:
    """Rotation angles [S, B, 1, head_dim] in float64, each angle repeated for its pair.

    `total_tokens` > S pads the table with zero angles (identity rotation) for the padding
    tokens that sequence parallelism appends.
    """
    row, col, time = token_positions(grid, frame_indice, config)
    inv = _axis_inv_freq(config)
    angles = torch.cat(
        [
            row.to(torch.float64)[..., None] * inv,
            col.to(torch.float64)[..., None] * inv,
            time.to(torch.float64)[..., None] * inv,
        ],
        dim=-1,
    )  # [S, B, d/2]
    angles = angles.repeat_interleave(2, dim=-1).unsqueeze(2)  # [S, B, 1, d]
    if total_tokens is not None and total_tokens > angles.shape[0]:
        pad = angles.new_zeros(total_tokens - angles.shape[0], *angles.shape[1:])
        angles = torch.cat([angles, pad], dim=0)
    return angles


def rope_cos_sin(angles: torch.Tensor, dtype: torch.dtype, device=None):
    """cos/sin tables in the compute dtype of the rotation (never below float32)."""
    compute = torch.promote_types(dtype, torch.float32)
    return (angles.cos().to(device=device, dtype=compute), angles.sin().to(device=device, dtype=compute))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [S, B, heads, d] pairwise: (a, b) → (a·cos − b·sin, b·cos + a·sin)."""
    xf = x.to(cos.dtype)
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)
