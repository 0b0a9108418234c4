"""Raw videos → filtered clips: PyAV decode, shot splitting (`shots`), quality filters, dedup, manifest.

Every decision is recorded: `process_videos` writes one JSONL line per clip (kept or dropped, with
the reason and the measured metrics) and one per video that could not be decoded. A corrupt or
truncated file is a recorded `decode_error`, never an exception out of the pipeline.

Numbers are on 8-bit luma (0–255). The paper (docs/reference.md §5.1) keeps Laplacian variance in
[200, 2000], optical-flow magnitude in [1, 20] px on 3 evenly spaced frame pairs (here OpenCV's
Farnebäck flow by default; RAFT or any flow plugs in through `scorers`) and aesthetic score ≥ 4.5
(a pluggable scorer; none ships offline). Dedup is a separate pass over records in order
(`Deduper`), so the per-video work (`process_video`) is independent and can run on Beam workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from mugv.data.video import VideoDecodeError, decode_video
from mugv_data.shots import DEFAULT_DETECTORS


def luma(frames: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] uint8 → [..., H, W] float32 BT.601 luma in 0–255."""
    f = frames.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (OpenCV's ksize=1 kernel) over the interior."""
    g = gray.astype(np.float64)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def _sample_indices(n: int, k: int = 3) -> list[int]:
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def motion_score(frames: np.ndarray) -> float:
    """Mean |Δluma| of the (start, middle, end) consecutive-frame pairs; 0 for a single frame
    (the `frame_difference` motion scorer)."""
    from mugv_data.scorers import FrameDifferenceScorer

    return FrameDifferenceScorer()(frames)


def dhash(frame: np.ndarray, size: int = 8) -> int:
    """64-bit difference hash of a frame: sign of horizontal gradients of a 9×8 block-mean image."""
    g = luma(frame)
    h, w = g.shape
    ys = np.linspace(0, h, size + 1).astype(int)
    xs = np.linspace(0, w, size + 2).astype(int)
    small = np.array(
        [
            [g[ys[i] : max(ys[i + 1], ys[i] + 1), xs[j] : max(xs[j + 1], xs[j] + 1)].mean() for j in range(size + 1)]
            for i in range(size)
        ]
    )
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    shot_detectors: tuple[str, ...] = DEFAULT_DETECTORS  # names in shots.KNOWN_DETECTORS
    shot_min_frames: int = 4  # PySceneDetect's min_scene_len (its default 15 glues short shots on)
    content_threshold: float = 27.0  # PySceneDetect's ContentDetector default
    adaptive_threshold: float = 3.0  # PySceneDetect's AdaptiveDetector default
    transnet_threshold: float = 0.5  # TransNetV2's released threshold
    min_seconds: float = 1.0
    max_seconds: float = 60.0
    min_height: int = 64
    min_width: int = 64
    sharpness_min: float = 200.0  # docs/reference.md §5.1 (OpenCV Laplacian variance)
    sharpness_max: float = 2000.0
    motion: str = "farneback"  # a name in scorers.MOTION_SCORERS
    motion_min: float = 1.0  # docs/reference.md §5.1, flow px/frame; below: static
    motion_max: float = 20.0  # above: too dynamic (flashes, shake)
    black_luma: float = 16.0  # mean luma below this: black
    dedup_hamming: int = 4  # dHash distance at or below this: near-duplicate
    aesthetic: str | None = None  # a name in scorers.AESTHETIC_SCORERS; None: no aesthetic filter
    aesthetic_min: float = 4.5  # docs/reference.md §5.1
    captioner: str | None = None  # a name in scorers.CAPTIONERS; None: captions from a manifest


@dataclasses.dataclass
class Scorers:
    """The scorer objects a FilterConfig names, and its shot splitter, built once per process
    (they may hold models)."""

    motion: object
    aesthetic: object | None = None
    captioner: object | None = None
    shots: object | None = None  # frames, fps → [shots.Shot]; None: the FilterConfig's splitter

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> Scorers:
        from mugv_data import scorers

        return cls(
            scorers.build("motion", cfg.motion),
            scorers.build("aesthetic", cfg.aesthetic),
            scorers.build("captioner", cfg.captioner),
            shot_splitter(cfg),
        )


def shot_splitter(cfg: FilterConfig):
    from mugv_data.shots import ShotSplitter

    return ShotSplitter(
        cfg.shot_detectors,
        min_shot_frames=cfg.shot_min_frames,
        content_threshold=cfg.content_threshold,
        adaptive_threshold=cfg.adaptive_threshold,
        transnet_threshold=cfg.transnet_threshold,
    )


def clip_metrics(frames: np.ndarray, motion=None) -> dict:
    idx = _sample_indices(frames.shape[0])
    gray = luma(frames[idx])
    sharp = [laplacian_variance(g) for g in gray]
    return {
        "sharpness": float(np.median(sharp)),
        "motion": float((motion or _default_motion())(frames)),
        "mean_luma": float(luma(frames[:: max(1, frames.shape[0] // 8)]).mean()),
        "dhash": f"{dhash(frames[frames.shape[0] // 2]):016x}",
    }


def _default_motion():
    from mugv_data.scorers import build

    return build("motion", FilterConfig.motion)


def judge(metrics: dict, *, num_frames: int, fps: float, height: int, width: int, cfg: FilterConfig) -> str | None:
    """The first failed filter's name, or None to keep. Order: cheap/decisive checks first."""
    seconds = num_frames / fps
    if seconds < cfg.min_seconds:
        return "too_short"
    if seconds > cfg.max_seconds:
        return "too_long"
    if height < cfg.min_height or width < cfg.min_width:
        return "low_resolution"
    if metrics["mean_luma"] < cfg.black_luma:
        return "black"
    if metrics["motion"] < cfg.motion_min:
        return "static"
    if metrics["motion"] > cfg.motion_max:
        return "too_dynamic"
    if metrics["sharpness"] < cfg.sharpness_min:
        return "blurry"
    if metrics["sharpness"] > cfg.sharpness_max:
        return "too_sharp"
    if metrics.get("aesthetic") is not None and metrics["aesthetic"] < cfg.aesthetic_min:
        return "low_aesthetic"
    return None


@dataclasses.dataclass
class Clip:
    clip_id: str
    video: str
    start: int
    end: int
    fps: float
    frames: np.ndarray  # [T, H, W, 3] uint8
    caption: str = ""
    aesthetic: float | None = None


class Deduper:
    """Near-duplicate removal over manifest records in order: a kept record within
    `max_hamming` of an earlier kept one becomes `near_duplicate` (with `duplicate_of`)."""

    def __init__(self, max_hamming: int = 4):
        self.max_hamming = max_hamming
        self.seen: dict[str, int] = {}

    def __call__(self, rec: dict) -> dict:
        if not rec.get("kept"):
            return rec
        hv = int(rec["metrics"]["dhash"], 16)
        dup_of = next((cid for cid, other in self.seen.items() if hamming(hv, other) <= self.max_hamming), None)
        if dup_of is None:
            self.seen[rec["clip_id"]] = hv
            return rec
        return dict(rec, kept=False, reason="near_duplicate", duplicate_of=dup_of)


def split_and_filter(
    video_id: str,
    frames: np.ndarray,
    fps: float,
    cfg: FilterConfig,
    seen_hashes: dict[str, int] | None = None,
    *,
    scorers: Scorers | None = None,
    dedup: bool = True,
) -> Iterator[tuple[Clip, dict]]:
    """Every shot of one decoded video with its manifest record (`kept`, `reason`, metrics).

    `seen_hashes` (clip_id → dHash) carries dedup state across videos; a kept clip is added to it.
    `dedup=False` leaves dedup to a later `Deduper` pass. The aesthetic scorer (costly) runs only
    on clips that passed every other filter; a configured captioner only on kept clips.
    """
    sc = scorers or Scorers.from_config(cfg)
    splitter = sc.shots if sc.shots is not None else shot_splitter(cfg)
    deduper = Deduper(cfg.dedup_hamming)
    if seen_hashes is not None:
        deduper.seen = seen_hashes
    t, h, w, _ = frames.shape
    for k, shot in enumerate(splitter(frames, fps)):
        a, b = shot.start, shot.end
        clip = Clip(f"{video_id}#{k:04d}", video_id, a, b, fps, frames[a:b])
        m = clip_metrics(clip.frames, sc.motion)
        reason = judge(m, num_frames=b - a, fps=fps, height=h, width=w, cfg=cfg)
        if reason is None and sc.aesthetic is not None:
            m["aesthetic"] = float(sc.aesthetic(clip.frames))
            clip.aesthetic = m["aesthetic"]
            reason = judge(m, num_frames=b - a, fps=fps, height=h, width=w, cfg=cfg)
        rec = {
            "clip_id": clip.clip_id,
            "video": video_id,
            "start": a,
            "end": b,
            "fps": fps,
            "num_frames": b - a,
            "height": h,
            "width": w,
            "kept": reason is None,
            "reason": reason,
            "metrics": m,
            "motion_scorer": getattr(sc.motion, "name", "custom"),
            "shot_detector": getattr(splitter, "name", "custom"),
            "cut_in": shot.cut_in and shot.cut_in.to_json(),
            "cut_out": shot.cut_out and shot.cut_out.to_json(),
        }
        if dedup:
            rec = deduper(rec)
        if rec["kept"] and sc.captioner is not None:
            clip.caption = str(sc.captioner(clip.frames, fps))
            rec["caption"], rec["caption_source"] = clip.caption, getattr(sc.captioner, "name", "captioner")
        yield clip, rec


def process_video(
    path: str, cfg: FilterConfig, *, scorers: Scorers | None = None, max_frames: int | None = None
) -> tuple[list[dict], list[Clip]]:
    """One video's manifest records and its clips that passed the filters, before dedup.
    An undecodable file gives one `decode_error` record and no clips."""
    video_id = os.path.basename(path)
    try:
        frames, fps = decode_video(path, max_frames)
    except VideoDecodeError as e:
        return [
            {
                "clip_id": None,
                "video": video_id,
                "path": path,
                "kept": False,
                "reason": "damaged" if e.damaged else "decode_error",
                "error": e.reason,
            }
        ], []
    recs, kept = [], []
    for clip, rec in split_and_filter(video_id, frames, fps, cfg, scorers=scorers, dedup=False):
        recs.append(rec)
        if rec["kept"]:
            kept.append(clip)
    return recs, kept


def process_videos(
    paths: Sequence[str],
    manifest_path: str,
    cfg: FilterConfig = FilterConfig(),
    max_frames: int | None = None,
    progress: bool = False,
    scorers: Scorers | None = None,
) -> list[Clip]:
    """Decode, split, filter and dedup `paths`; write the JSONL manifest; return the kept clips.

    The manifest is written to a temporary name and renamed at the end, so a crash never leaves a
    manifest that looks complete.
    """
    sc = scorers or Scorers.from_config(cfg)
    kept: list[Clip] = []
    deduper = Deduper(cfg.dedup_hamming)
    tmp = manifest_path + ".tmp"
    it: Iterable[str] = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="videos", unit="video")
    with open(tmp, "w") as f:
        for path in it:
            recs, clips_ = process_video(path, cfg, scorers=sc, max_frames=max_frames)
            by_id = {c.clip_id: c for c in clips_}
            for rec in recs:
                rec = deduper(rec)
                f.write(json.dumps(rec) + "\n")
                if rec["kept"]:
                    kept.append(by_id[rec["clip_id"]])
    os.replace(tmp, manifest_path)
    return kept


def read_manifest(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
