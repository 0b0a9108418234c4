"""`prepare` as a keyed source: independent work items (one video file, or a chunk of procedural
clips) that run in one process or on Apache Beam workers and give the same records.

Per item (`ItemWorker`): decode → shots → filters (scorers) → captions (manifest / captioner /
bundled; optional aesthetic suffix) → bucket resize → VAE → text features. Example keys are
`item · 2^20 + shot`, so tfds writes records in (item, shot) order on either path. Near-duplicate
removal needs every earlier clip, so it runs after the items, over the manifest records in key
order (`clips.Deduper`): inline in the one-process path, as one global step on the clip hashes in
the Beam path (a few bytes per clip; the latents never leave their worker before the writer). The
manifest (`manifest.jsonl`, one line per clip with its decision) is written atomically at the end.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Iterator, Sequence

from mugv_data.clips import Deduper, FilterConfig
from mugv_data.encode import PixelBucket

ITEM_STRIDE = 2**20  # shots per item; keys stay exact in tfds's 128-bit key space
UNCAPTIONED = ("refuse", "skip", "empty")
NO_CAPTION_HELP = (
    "give captions (--captions=FILE with a clip_id or video row), a --captioner, or choose "
    "--uncaptioned=skip (leave such clips out, counted) or --uncaptioned=empty (train them with an "
    "empty caption)"
)


@dataclasses.dataclass
class PrepareSpec:
    """Everything a worker needs to turn an item into examples (picklable; no models inside)."""

    source: str  # "files" or "procedural"
    buckets: list[PixelBucket]
    paths: list[str] = dataclasses.field(default_factory=list)
    filters: FilterConfig = FilterConfig()
    captions: str | None = None  # CSV/JSONL for ManifestCaptions
    vae: str = "patch-mean"  # tiny-random | patch-mean | checkpoint path
    vae_preset: str = "release"
    text_encoder: str = "hashing"
    text_len: int = 32
    batch_size: int = 4
    max_frames: int | None = 300
    aes_suffix: str | float | None = None  # None, "score" (the clip's), or a fixed score
    plugins: tuple[str, ...] = ()  # modules that register scorers/captioners
    uncaptioned: str = "refuse"  # a clip with no caption: "refuse", "skip" (counted) or "empty"
    procedural_count: int = 64
    procedural_frames: int = 17
    procedural_size: int = 32
    seed: int = 0
    clips_per_item: int = 16

    def num_items(self) -> int:
        if self.source == "procedural":
            return -(-self.procedural_count // self.clips_per_item)
        return len(self.paths)


def make_latent_encoder(vae: str, preset: str = "release"):
    from mugv_data import encode

    if vae == "patch-mean":
        return encode.PatchMeanEncoder()
    if vae == "tiny-random":
        return encode.JaxVAEEncoder(None, "tiny", micro_frame_size=None, micro_batch_size=None)
    return encode.JaxVAEEncoder(vae, preset)


class ItemWorker:
    """item index → (keyed manifest records, keyed examples before dedup). Models are built on
    first use, in the process that runs the item, and are not pickled."""

    def __init__(self, spec: PrepareSpec):
        self.spec = spec
        self._built = None

    def __getstate__(self):
        return {"spec": self.spec, "_built": None}

    def _build(self):
        if self._built is None:
            from mugv_data import clips, scorers, text

            for m in self.spec.plugins:
                importlib.import_module(m)
            s = self.spec
            self._built = {
                "lat": make_latent_encoder(s.vae, s.vae_preset),
                "txt": text.get_encoder(s.text_encoder, max_length=s.text_len),
                "scorers": clips.Scorers.from_config(s.filters) if s.source == "files" else None,
                "captions": scorers.ManifestCaptions(s.captions) if s.captions else None,
            }
        return self._built

    def latent_encoder(self):
        return self._build()["lat"]

    def text_encoder(self):
        return self._build()["txt"]

    def __call__(self, item: int) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
        from mugv_data import encode

        b = self._build()
        inputs, keys, records = self._clip_inputs(item, b)
        by_id = {sid: k for k, sid in keys}
        dropped = {}
        examples = list(
            encode.encode_clips(
                inputs,
                self.spec.buckets,
                b["lat"],
                b["txt"],
                batch_size=self.spec.batch_size,
                on_drop=lambda sid, why: dropped.__setitem__(sid, why),
            )
        )
        for _key, rec in records:
            if rec.get("clip_id") in dropped:
                rec.update(kept=False, reason="no_bucket", detail=dropped[rec["clip_id"]])
        keyed = sorted(((by_id[ex["sample_id"]], ex) for ex in examples), key=lambda kv: kv[0])
        return records, keyed

    def _clip_inputs(self, item: int, b: dict):
        from mugv.data import bundled, procedural
        from mugv_data import clips, text
        from mugv_data.encode import ClipInput

        s = self.spec
        if s.source == "procedural":
            lo = item * s.clips_per_item
            out, keys = [], []
            for i in range(lo, min(lo + s.clips_per_item, s.procedural_count)):
                c = procedural.make_clip(i, seed=s.seed, num_frames=s.procedural_frames, size=s.procedural_size)
                cap = text.with_aesthetic_suffix(c.caption, self._fixed_aes(c.sample_id))
                out.append(ClipInput(c.sample_id, "procedural", cap, c.frames, c.fps))
                keys.append((item * ITEM_STRIDE + i - lo, c.sample_id))
            return out, keys, []
        recs, kept = clips.process_video(s.paths[item], s.filters, scorers=b["scorers"], max_frames=s.max_frames)
        records = [
            (item * ITEM_STRIDE + (int(r["clip_id"].rsplit("#", 1)[1]) if r.get("clip_id") else 0), r) for r in recs
        ]
        rec_by_id = {r["clip_id"]: r for _, r in records}
        out, keys = [], []
        for c in kept:
            rec = rec_by_id[c.clip_id]
            found = b["captions"].lookup(c.clip_id, c.video) if b["captions"] else None
            if found:
                cap, aes = found
                rec["caption_source"] = "manifest"
            elif c.caption:
                cap, aes = c.caption, None
            else:
                cap, aes = bundled.caption_for(c.video), None
                rec["caption_source"] = "bundled" if cap else "none"
            aes = c.aesthetic if aes is None else aes
            if not cap:
                if s.uncaptioned == "refuse":
                    raise ValueError(f"clip {c.clip_id} has no caption; {NO_CAPTION_HELP}")
                if s.uncaptioned == "skip":
                    rec.update(kept=False, reason="no_caption")
                    continue
            cap = text.with_aesthetic_suffix(cap, self._aes_for(c.clip_id, aes))
            rec["caption"] = cap
            out.append(ClipInput(c.clip_id, c.video, cap, c.frames, c.fps))
            keys.append((item * ITEM_STRIDE + int(c.clip_id.rsplit("#", 1)[1]), c.clip_id))
        return out, keys, records

    def _fixed_aes(self, sample_id: str):
        if self.spec.aes_suffix == "score":
            raise ValueError(
                f"{sample_id}: --aes-suffix=score needs an aesthetic score, and procedural "
                f"clips have none; give a fixed score (e.g. 6.0)"
            )
        return None if self.spec.aes_suffix is None else float(self.spec.aes_suffix)

    def _aes_for(self, clip_id: str, measured: float | None):
        if self.spec.aes_suffix != "score":
            return self._fixed_aes(clip_id)
        if measured is None:
            raise ValueError(
                f"clip {clip_id}: --aes-suffix=score but no aesthetic score (give an aesthetic "
                f"scorer or an 'aesthetic' column in the captions file)"
            )
        return measured


def uncaptioned_videos(spec: PrepareSpec) -> list[str]:
    """Videos none of whose clips can get a caption (no captioner, no row in the captions file,
    no bundled caption): checked before any work when such clips are refused."""
    from mugv.data import bundled
    from mugv_data import scorers

    if spec.source != "files" or spec.filters.captioner or spec.uncaptioned != "refuse":
        return []
    rows = scorers.ManifestCaptions(spec.captions) if spec.captions else None
    names = [(p, os.path.basename(p)) for p in spec.paths]
    return [p for p, n in names if not bundled.caption_for(n) and not (rows and rows.covers(n))]


def check_captions(spec: PrepareSpec) -> None:
    if spec.uncaptioned not in UNCAPTIONED:
        raise ValueError(f"--uncaptioned={spec.uncaptioned!r}: choose one of {', '.join(UNCAPTIONED)}")
    missing = uncaptioned_videos(spec)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} of {len(spec.paths)} videos have no caption for any clip ({shown}); {NO_CAPTION_HELP}"
        )


def _write_manifest(path: str, records: Sequence[dict]) -> None:
    from etils import epath  # tfds's path library: local, gs:// and the other Beam filesystems

    tmp = epath.Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(path)


def _dedup_and_write(keyed_records: list, manifest: str | None, max_hamming: int) -> set:
    """The global step: records in key order → dedup → manifest; returns the dropped clip ids."""
    deduper, out, dropped = Deduper(max_hamming), [], set()
    for _, rec in sorted(keyed_records, key=lambda kv: kv[0]):
        rec = deduper(rec)
        if rec.get("reason") == "near_duplicate":
            dropped.add(rec["clip_id"])
        out.append(rec)
    if manifest:
        _write_manifest(manifest, out)
    return dropped


class PrepareSource:
    """The keyed source `shards.write_shards` builds from, on either path."""

    def __init__(self, spec: PrepareSpec, manifest: str | None, progress: bool = True):
        self.spec, self.manifest, self.progress = spec, manifest, progress
        self.worker = ItemWorker(spec)

    def keyed_examples(self) -> Iterator[tuple[int, dict]]:
        items = range(self.spec.num_items())
        if self.progress:
            from tqdm import tqdm

            items = tqdm(items, desc="items" if self.spec.source == "procedural" else "videos", unit="item")
        deduper, out, n = Deduper(self.spec.filters.dedup_hamming), [], 0
        for item in items:
            records, examples = self.worker(item)
            dropped = set()
            for _, rec in records:
                rec = deduper(rec)
                if rec.get("reason") == "near_duplicate":
                    dropped.add(rec["clip_id"])
                out.append(rec)
            for key, ex in examples:
                if ex["sample_id"] not in dropped:
                    n += 1
                    yield key, ex
        if self.manifest and self.spec.source == "files":
            _write_manifest(self.manifest, out)
        if n == 0:
            reasons = sorted({str(r.get("reason")) for r in out})
            raise ValueError(
                f"no clip survived the filters (reasons: {reasons}); every decision is in "
                f"{self.manifest}. Loosen the thresholds (e.g. --sharpness-min) or add videos"
            )

    def beam_examples(self, pbegin):
        import apache_beam as beam

        worker, manifest = self.worker, (self.manifest if self.spec.source == "files" else None)
        hamming = self.spec.filters.dedup_hamming
        results = (
            pbegin
            | "Items" >> beam.Create(list(range(self.spec.num_items())))
            | "SpreadItems" >> beam.Reshuffle()  # one item per bundle where it can
            | "ProcessItems" >> beam.Map(worker)
        )
        dropped = (
            results
            | "Records" >> beam.FlatMap(lambda r: r[0])
            | "AllRecords" >> beam.combiners.ToList()
            | "DedupAndManifest" >> beam.Map(_dedup_and_write, manifest, hamming)
        )
        return (
            results
            | "Examples" >> beam.FlatMap(lambda r: r[1])
            | "DropDuplicates"
            >> beam.Filter(lambda kv, d: kv[1]["sample_id"] not in d, d=beam.pvalue.AsSingleton(dropped))
        )
