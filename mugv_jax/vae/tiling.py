"""Spatial tiling of the VAE networks: bounded memory for large frames, with blended seams.

`Tiled(vae, Tiling(...))` wraps a `VideoVAE` (traceable; tiles run under `lax.map`) or a
`JittedVAE` (one compiled executable per tile shape) and exposes the same `Pipeline` methods
(`encode`, `decode`, `posterior`, ...). Each selected network call is cut into overlapping
tiles on the latent grid (tile and overlap are counted in latents, 1 latent = 8 pixels), every
tile runs as its own batch element, and the outputs are blended with linear ramps across the
overlaps.

Tiling can never be exact for this VAE: the 2D mid-block attention spans the whole frame and
every GroupNorm takes statistics over the whole frame (2D) or window (3D), so a tile sees
different statistics than the full frame — no receptive-field overlap recovers them. The seams
are smoothed, not removed; tests/mugv_jax/test_vae_tiling.py states the measured error.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mugv_jax.vae.orchestration import NETWORKS, Pipeline

# network → (spatial axes of its input, spatial axes of its output, output pixels per input pixel)
_GEOMETRY = {
    "encode_frames": ((1, 2), (1, 2), 1 / 8),
    "decode_frames": ((1, 2), (1, 2), 8),
    "encode_groups": ((2, 3), (1, 2), 1),
    "decode_window": ((2, 3), (2, 3), 1),
}
# Input pixels per latent cell of each network.
_IN_UNIT = {"encode_frames": 8, "decode_frames": 1, "encode_groups": 1, "decode_window": 1}


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile size and overlap in latent cells (×8 pixels); which networks are tiled."""

    tile: int = 32
    overlap: int = 8
    networks: tuple[str, ...] = ("encode_frames", "decode_frames")

    def __post_init__(self):
        if self.tile < 1 or self.overlap < 0 or self.overlap >= self.tile:
            raise ValueError(
                f"Tiling needs tile >= 1 and 0 <= overlap < tile, got tile={self.tile}, overlap={self.overlap}"
            )
        bad = set(self.networks) - set(NETWORKS)
        if bad:
            raise ValueError(f"Tiling.networks: unknown networks {sorted(bad)}; choose from {NETWORKS}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of full-size tiles covering [0, length), each overlap >= `overlap`.

    Starts are spread evenly, so every tile has the same shape (one compile) and the last tile
    ends exactly at `length`.
    """
    if length <= tile:
        return [0]
    n = -(-(length - overlap) // (tile - overlap))
    return sorted({round(i * (length - tile) / (n - 1)) for i in range(n)})


def _ramp(length: int, start: int, stop: int, margin: float, ramp: float) -> np.ndarray:
    """1D blend weights of a tile covering [start, stop) of an axis of `length` cells.

    At an inner edge the weight is 0 for `margin` cells (where the tile's own zero padding
    corrupts its output), then rises linearly over `ramp` cells; flat at the frame borders.
    """
    x = np.arange(start, stop, dtype=np.float64) + 0.5
    w = np.ones(stop - start)
    if ramp > 0:
        if start > 0:
            w = np.minimum(w, np.clip((x - start - margin) / ramp, 0, 1))
        if stop < length:
            w = np.minimum(w, np.clip((stop - x - margin) / ramp, 0, 1))
    return w


class Tiled(Pipeline):
    """`inner`'s pipeline with the networks of `tiling.networks` run tile by tile."""

    def __init__(self, inner: Pipeline, tiling: Tiling = Tiling()):
        self.inner = inner
        self.tiling = tiling
        self.config = inner.config
        self.compute_dtype = inner.compute_dtype

    def _latent_buffers(self):
        return self.inner._latent_buffers()

    def _run(self, network, inputs):
        if network not in self.tiling.networks:
            return self.inner._run(network, inputs)
        in_axes, out_axes, out_per_in = _GEOMETRY[network]
        unit = _IN_UNIT[network]
        shape = inputs[0].shape
        cells = [shape[a] // unit for a in in_axes]
        if any(shape[a] % unit for a in in_axes):
            raise ValueError(
                f"tiled {network}: input spatial size {[shape[a] for a in in_axes]} is not a multiple of {unit}"
            )
        t, o = self.tiling.tile, self.tiling.overlap
        starts = [tile_starts(c, t, o) for c in cells]
        if all(len(s) == 1 for s in starts):
            return self.inner._run(network, inputs)
        sizes = [min(t, c) for c in cells]
        boxes = [(y, x) for y in starts[0] for x in starts[1]]

        def crop(x, y0, x0):
            idx = [slice(None)] * x.ndim
            idx[in_axes[0]] = slice(y0 * unit, (y0 + sizes[0]) * unit)
            idx[in_axes[1]] = slice(x0 * unit, (x0 + sizes[1]) * unit)
            return x[tuple(idx)]

        # Every tile of every input goes through one run: same shape, one compiled network.
        tiles = [crop(x, y0, x0) for x in inputs for (y0, x0) in boxes]
        outs = self.inner._run(network, tiles)
        out_unit = unit * out_per_in  # output pixels per latent cell
        out_sizes = [round(c * out_unit) for c in cells]
        # Neighbours overlap by >= o cells: each ignores the outer quarter at its edge and ramps
        # over the middle half, so some tile always has full weight and the weights sum to >= 1.
        # Exact for networks whose reach is <= o/4 latents (none of this VAE's: see the docstring).
        margin, ramp = o * out_unit / 4, o * out_unit / 2
        weights = []
        for y0, x0 in boxes:
            wy = _ramp(out_sizes[0], round(y0 * out_unit), round((y0 + sizes[0]) * out_unit), margin, ramp)
            wx = _ramp(out_sizes[1], round(x0 * out_unit), round((x0 + sizes[1]) * out_unit), margin, ramp)
            weights.append(np.outer(wy, wx))
        results = []
        for i in range(len(inputs)):
            first = outs[i * len(boxes)]
            full = list(first.shape)
            full[out_axes[0]], full[out_axes[1]] = out_sizes
            acc = jnp.zeros(full, jnp.float32)
            norm = np.zeros(out_sizes)
            for j, (y0, x0) in enumerate(boxes):
                w = weights[j]
                ys = slice(round(y0 * out_unit), round(y0 * out_unit) + w.shape[0])
                xs = slice(round(x0 * out_unit), round(x0 * out_unit) + w.shape[1])
                bshape = [1] * len(full)
                bshape[out_axes[0]], bshape[out_axes[1]] = w.shape
                idx = [slice(None)] * len(full)
                idx[out_axes[0]], idx[out_axes[1]] = ys, xs
                acc = acc.at[tuple(idx)].add(
                    outs[i * len(boxes) + j].astype(jnp.float32) * jnp.asarray(w.reshape(bshape), jnp.float32)
                )
                norm[ys, xs] += w
            nshape = [1] * len(full)
            nshape[out_axes[0]], nshape[out_axes[1]] = out_sizes
            results.append((acc / jnp.asarray(norm.reshape(nshape), jnp.float32)).astype(first.dtype))
        return results


def tiled(
    vae: Pipeline, tile: int = 32, overlap: int = 8, networks: tuple[str, ...] = ("encode_frames", "decode_frames")
) -> Tiled:
    return Tiled(vae, Tiling(tile, overlap, tuple(networks)))
