"""`python -m mugv_jax.vae encode|decode|train ...` (docs/vae.md, "Command line").

Exit codes: 0 every input done; 3 some inputs skipped (each named with its reason at the end,
the others done); 1 nothing done or a fatal error; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

from mugv.io import latents as latents_file

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3


def _vae_config(spec: str):
    from mugv.vae_config import VAEConfig, get_vae_config

    if spec.endswith(".json"):
        with open(spec) as f:
            return VAEConfig.from_dict(json.load(f))
    return get_vae_config(spec)


class ChunkProgress:
    """A bar per network call inside one video (JittedVAE.progress): a long clip shows where it is."""

    def __init__(self):
        self.bar, self.network, self.name = None, None, ""

    def start(self, name: str) -> None:
        self.close()
        self.name = name

    def __call__(self, network: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if network != self.network or self.bar is None:
            self.close()
            self.network = network
            self.bar = tqdm(total=total, desc=f"  {self.name}: {network}", unit="chunk", leave=False, file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.network = None, None


def _model(args, progress: ChunkProgress | None = None):
    import mugv_jax.vae as vae
    from mugv_jax import compilation_cache
    from mugv_jax.vae.tiling import Tiled, Tiling

    compilation_cache.setup(compilation_cache.user_cache_dir(), args.compilation_cache)

    cfg = _vae_config(args.vae_config)
    if args.micro_batch_size:
        cfg = cfg.replace(micro_batch_size=args.micro_batch_size)
    model = vae.jit(vae.load(args.weights, cfg))
    model.progress = progress
    if args.tile:
        return Tiled(model, Tiling(args.tile, args.overlap)), cfg
    return model, cfg


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _report(done: int, failures: list[tuple[str, str]], what: str) -> int:
    if failures:
        print(f"\n{len(failures)} of {done + len(failures)} inputs skipped ({what}):", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    if done == 0:
        return EXIT_FATAL
    return EXIT_SKIPPED if failures else EXIT_OK


def cmd_encode(args) -> int:
    import jax
    from tqdm import tqdm

    from mugv_jax.vae.videos import read_videos, to_unit

    os.makedirs(args.out, exist_ok=True)
    chunks = ChunkProgress()
    model, _ = _model(args, chunks)
    failures: list[tuple[str, str]] = []
    done = 0
    key = jax.random.key(args.seed)
    for path, frames, fps in tqdm(
        read_videos(args.inputs, failures, max_frames=args.max_frames),
        total=len(args.inputs),
        desc="encode",
        unit="video",
    ):
        h, w = frames.shape[1] // 8 * 8, frames.shape[2] // 8 * 8
        if h == 0 or w == 0:
            failures.append((path, f"frames of {frames.shape[1]}×{frames.shape[2]} px are smaller than 8×8"))
            continue
        # Crop to multiples of 8 so that decode gives back the same size.
        y0, x0 = (frames.shape[1] - h) // 2, (frames.shape[2] - w) // 2
        video = to_unit(frames[:, y0 : y0 + h, x0 : x0 + w]).transpose(3, 0, 1, 2)[None]
        chunks.start(_stem(path))
        if args.sample:
            z = model.encode(video, sample=True, key=jax.random.fold_in(key, done))
        else:
            z = model.encode(video)
        meta = {
            "name": _stem(path),
            "source": os.path.abspath(path),
            "num_frames": int(frames.shape[0]),
            "fps": fps,
            "height": h,
            "width": w,
            "sample": bool(args.sample),
        }
        out = latents_file.write(
            os.path.join(args.out, f"{meta['name']}.{args.format}"), np.asarray(z[0]), meta, sidecar=True
        )
        chunks.close()
        tqdm.write(
            f"wrote {out}: latents {list(z.shape[1:])} from {meta['num_frames']} frames of {h}×{w}", file=sys.stderr
        )
        done += 1
    return _report(done, failures, "unreadable videos")


def cmd_decode(args) -> int:
    from tqdm import tqdm

    from mugv.data.video import write_mp4
    from mugv_jax.vae.videos import to_uint8

    os.makedirs(args.out, exist_ok=True)
    chunks = ChunkProgress()
    model, cfg = _model(args, chunks)
    failures, done = [], 0
    for path in tqdm(args.inputs, desc="decode", unit="file"):
        try:
            z, meta = latents_file.read(path)
        except (OSError, ValueError) as e:
            failures.append((path, f"{type(e).__name__}: {e}"))
            continue
        if z.shape[1] != cfg.embed_dim:
            failures.append((path, f"latents have {z.shape[1]} channels, the VAE expects {cfg.embed_dim}"))
            continue
        num_frames = args.num_frames or meta.get("num_frames") or 8 * z.shape[2]
        chunks.start(_stem(path))
        video = np.asarray(model.decode(z, int(num_frames)))
        chunks.close()
        frames = to_uint8(video[0].transpose(1, 2, 3, 0))
        # Sampled sizes that are not multiples of 8 decode padded: crop back to the asked size.
        frames = frames[:, : meta.get("height") or None, : meta.get("width") or None]
        fps = args.fps or meta.get("fps") or 24.0
        out = os.path.join(args.out, _stem(path) + ".mp4")
        write_mp4(out, frames, fps)
        tqdm.write(
            f"wrote {out}: {frames.shape[0]} frames of {frames.shape[1]}×{frames.shape[2]} at {fps:g} fps",
            file=sys.stderr,
        )
        done += 1
    return _report(done, failures, "unreadable latents")


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` → its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no file {path}")
    module_spec = importlib.util.spec_from_file_location("_vae_train_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def cmd_train(args) -> int:
    from mugv_jax.vae.training import train_vae

    config = load_config_file(args.config)
    if args.steps is not None:
        config.num_steps = args.steps
    if args.videos:
        config.data.videos = args.videos
    result = train_vae(config, args.workdir, progress=True)
    print(
        f"weights: {result['weights']}\nsteps: {result['steps']}\n"
        f"held-out PSNR: {result['psnr_before']:.2f} → {result['psnr_after']:.2f} dB, "
        f"SSIM {result['ssim_before']:.3f} → {result['ssim_after']:.3f}"
    )
    return _report(1, [tuple(f) for f in result.get("skipped_videos", [])], "unreadable training videos")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mugv_jax.vae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(s):
        s.add_argument("--weights", required=True, help="release-layout vae.pt / .safetensors")
        s.add_argument("--vae-config", default="release", help="preset name or a VAEConfig .json")
        s.add_argument("--micro-batch-size", type=int, default=None, help="frames per 2D-VAE call")
        s.add_argument("--tile", type=int, default=0, help="spatial tile in latents (0: no tiling)")
        s.add_argument("--overlap", type=int, default=8, help="tile overlap in latents")
        s.add_argument("--out", required=True, help="output directory")
        s.add_argument(
            "--compilation-cache",
            default=None,
            help="JAX persistent compilation cache directory, or 'off' (default: $MUGV_COMPILATION_CACHE, "
            "else JAX's own setting, else ~/.cache/mugv/jax)",
        )

    e = sub.add_parser("encode", help="videos (mp4, gif, ...) → latents")
    model_args(e)
    e.add_argument("inputs", nargs="+")
    e.add_argument("--format", choices=("npy", "safetensors"), default="npy")
    e.add_argument("--sample", action="store_true", help="sample the posterior (default: its mean)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-frames", type=int, default=None)
    e.set_defaults(fn=cmd_encode)

    d = sub.add_parser("decode", help="latents (.npy/.safetensors) → H.264 mp4")
    model_args(d)
    d.add_argument("inputs", nargs="+")
    d.add_argument("--num-frames", type=int, default=None, help="default: from the encode sidecar")
    d.add_argument("--fps", type=float, default=None)
    d.set_defaults(fn=cmd_decode)

    t = sub.add_parser("train", help="train a VAE (mugv_jax.vae.training.train_vae)")
    t.add_argument("--config", default="configs/vae_tiny.py", help="config file[:arg]")
    t.add_argument("--workdir", required=True)
    t.add_argument("--steps", type=int, default=None, help="override config.num_steps")
    t.add_argument("--videos", default=None, help="override config.data.videos")
    t.set_defaults(fn=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
