"""Did the model learn? Two measures of a generated clip against the training clips.

* latent: the sample's latents are compared (RMS) with the training latents of every
  (colour, direction) group of the procedural set (mean distance to the group's 3 nearest clips);
  the check passes for a sample when the nearest group is its prompt's own. Shape is left out on purpose: held-out
  prompts are unseen
  (colour, shape, direction) combinations, so only their colour and direction have training clips.
* pixel: the decoded video's dominant object colour (nearest named colour of the pixels that
  differ most from the background) and motion direction (displacement of those pixels' centroid
  from the first to the last frames). Independent of latent space, so it also tests the VAE.
"""

from __future__ import annotations

import numpy as np

from mugv.data import procedural

FOREGROUND_SHARE = 0.06  # the procedural object covers about 1/16 of the frame


NEAREST_K = 3


def groups(latents: np.ndarray, train_meta: list[dict]) -> dict[tuple[str, str], np.ndarray]:
    """{(colour, direction): latents of the procedural training clips in that group}."""
    idx: dict[tuple[str, str], list[int]] = {}
    for i, m in enumerate(train_meta):
        if m.get("source") == "procedural":
            idx.setdefault((m["colour"], m["direction"]), []).append(i)
    return {k: latents[v] for k, v in sorted(idx.items())}


def nearest_group(z: np.ndarray, by_group: dict) -> tuple[tuple[str, str], dict]:
    """The group whose clips are closest to z: a group's distance is the mean RMS distance to its
    NEAREST_K closest clips (clips differ in shape and start offset, so a group's mean latent
    would be a blur that resembles no clip)."""
    dists = {}
    for k, zs in by_group.items():
        d = np.sqrt(np.mean((zs - z[None]) ** 2, axis=tuple(range(1, zs.ndim))))
        dists[k] = float(np.mean(np.sort(d)[:NEAREST_K]))
    return min(dists, key=dists.get), dists


def _foreground(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weights [H, W], mean colour [3]) of the pixels farthest from the frame's median colour."""
    x = frame.astype(np.float32)
    bg = np.median(x.reshape(-1, 3), axis=0)
    d = np.abs(x - bg).sum(axis=-1)
    k = max(1, int(round(FOREGROUND_SHARE * d.size)))
    thresh = np.partition(d.ravel(), -k)[-k]
    w = np.where(d >= thresh, d, 0.0)
    colour = (x * w[..., None]).sum(axis=(0, 1)) / max(w.sum(), 1e-6)
    return w, colour


def pixel_measure(video: np.ndarray) -> dict:
    """video [T, H, W, 3] uint8 → {"colour", "direction", "displacement" (dy, dx) in pixels}."""
    t, h, w, _ = video.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cents, cols = [], []
    for frame in video:
        wgt, col = _foreground(frame)
        s = max(wgt.sum(), 1e-6)
        cents.append(((wgt * yy).sum() / s, (wgt * xx).sum() / s))
        cols.append(col)
    cents = np.array(cents)
    q = max(1, t // 4)
    dy, dx = cents[-q:].mean(axis=0) - cents[:q].mean(axis=0)
    colour = np.mean(cols, axis=0)
    names = list(procedural.COLOURS)
    ref = np.array([procedural.COLOURS[n] for n in names], np.float32)
    colour_name = names[int(np.argmin(((ref - colour) ** 2).sum(axis=1)))]
    if abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return {"colour": colour_name, "direction": direction, "displacement": [float(dy), float(dx)]}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 videos."""
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def reconstruction(truth: np.ndarray, recon: np.ndarray, colours: list[str], directions: list[str]) -> dict:
    """How well a VAE round trip keeps procedural clips ([N, T, H, W, 3] uint8 each): PSNR (pooled
    and per clip), the RMS error per RGB channel on the object's pixels (where the truth differs
    from its median colour by more than 60 in summed |RGB|) and on the rest, and the pixel
    measure's colour and direction read off the reconstructions."""
    t = truth.astype(np.float32)
    err = recon.astype(np.float32) - t
    bg = np.median(t.reshape(len(t), -1, 3), axis=1)[:, None, None, None]
    obj = np.abs(t - bg).sum(axis=-1) > 60
    px = [pixel_measure(v) for v in recon]
    return {
        "clips": len(truth),
        "psnr": psnr(recon, truth),
        # Pooled PSNR hides which prompt fails: one hard clip (a white triangle) costs dB.
        "psnr_per_clip": [psnr(r, x) for r, x in zip(recon, truth)],
        "object_rmse_rgb": [float(np.sqrt(np.mean(err[..., k][obj] ** 2))) for k in range(3)],
        "background_rmse_rgb": [float(np.sqrt(np.mean(err[..., k][~obj] ** 2))) for k in range(3)],
        "pixel_colour_share": float(np.mean([p["colour"] == c for p, c in zip(px, colours)])),
        "pixel_direction_share": float(np.mean([p["direction"] == d for p, d in zip(px, directions)])),
    }
