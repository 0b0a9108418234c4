"""`python -m converters {convert,inspect,verify}`: checkpoints between release, Megatron and JAX.

    python -m converters convert --src release:dit.pt --dst jax:/ckpt/jax [--model 10b]
        [--dtype keep|float32|bfloat16] [--tp N --pp M] [--weights raw|ema] [--workers N] [--force]
        [--ema-layout mugv|official]
    python -m converters convert --src jax:RUN --dst megatron:DIR --adapters [--weights raw|ema]
    python -m converters export-peft --src jax:RUN|megatron:RUN --dst PEFT_DIR [--weights raw|ema]
    python -m converters merge --base dit.pt --adapters jax:RUN|megatron:RUN|PEFT_DIR --dst release:merged.safetensors
    python -m converters inspect PATH
    python -m converters verify A              # every byte against the checksums recorded at write
    python -m converters verify A B [--atol 1e-6]

FORMAT is release, megatron (torch_dist; reading also detects legacy), megatron-legacy or jax;
`PATH@N` names a JAX step or a Megatron iteration. `--adapters` converts only a LoRA run's
adapters (converters/adapters.py): an adapter-only checkpoint, bit-exact. Errors print one message and exit 2; verify
exits 1 when the checkpoints differ.
"""

from __future__ import annotations

import argparse
import json
import sys

from converters.formats import FORMATS
from mugv.config import DiTConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converters", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint to another format")
    c.add_argument("--src", required=True, help=f"FORMAT:PATH[@N] or PATH; FORMAT in {FORMATS}")
    c.add_argument("--dst", required=True, help="FORMAT:PATH[@N]")
    c.add_argument(
        "--model",
        help="model preset (1b, 4b, 10b, 18b, debug, tiny); default: the "
        "checkpoint's stored config, else detected from the shapes",
    )
    c.add_argument(
        "--dtype",
        default="keep",
        choices=["keep", "float32", "bfloat16"],
        help="keep (default, bit-exact) or cast every tensor",
    )
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size (Megatron outputs)")
    c.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (Megatron outputs)")
    c.add_argument(
        "--weights",
        default="raw",
        choices=["raw", "ema"],
        help="training checkpoint source (JAX, Megatron torch_dist): the trained weights (raw) or their EMA",
    )
    c.add_argument(
        "--ema-layout",
        choices=["mugv", "official"],
        default=None,
        help="torch_dist output: also write the source training checkpoint's EMA, in our layout (the "
        "weights' shapes) or the official trainer's for --tp (what its ema_restore.py reads)",
    )
    c.add_argument(
        "--max-shard-size",
        type=float,
        default=None,
        metavar="GB",
        help="sharded release output: shard size in GB (default 5)",
    )
    c.add_argument(
        "--workers",
        type=int,
        default=None,
        help="threads reading, transforming and writing tensors at once (default: a "
        "number for this machine; 1: one tensor at a time); the output is the same",
    )
    c.add_argument("--force", action="store_true", help="replace an existing output")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument(
        "--adapters",
        action="store_true",
        help="only the LoRA adapters of a run (or an adapter-only checkpoint), as an adapter-only jax:/megatron: one",
    )

    e = sub.add_parser("export-peft", help="a LoRA run's adapters as a PEFT adapter directory")
    e.add_argument("--src", required=True, help="jax:RUN[@STEP] or megatron:RUN[@ITER]")
    e.add_argument(
        "--dst", required=True, help="the directory to write (adapter_model.safetensors + adapter_config.json)"
    )
    e.add_argument("--weights", default="raw", choices=["raw", "ema"], help="the trained adapters (raw) or their EMA")
    e.add_argument("--force", action="store_true", help="replace an existing output")

    m = sub.add_parser("merge", help="a release file of a base with LoRA adapters folded in (W + scale·B·A)")
    m.add_argument("--base", required=True, help="the base checkpoint, any format ([FORMAT:]PATH[@N])")
    m.add_argument("--adapters", required=True, help="jax:RUN, megatron:RUN (or adapter-only) or a PEFT directory")
    m.add_argument("--dst", required=True, help="release:PATH (.safetensors, .pt, or a directory of shards)")
    m.add_argument("--weights", default="raw", choices=["raw", "ema"], help="a run's adapters (raw) or their EMA")
    m.add_argument("--force", action="store_true", help="replace an existing output")

    i = sub.add_parser("inspect", help="format, config, tensor count, dtypes and size")
    i.add_argument("path", help="[FORMAT:]PATH[@N]")
    i.add_argument("--weights", default="raw", choices=["raw", "ema"])
    i.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser(
        "verify",
        help="check a checkpoint against the checksums recorded when it was written, or compare two "
        "(any formats) tensor by tensor after checking each",
    )
    v.add_argument("a", help="[FORMAT:]PATH[@N]")
    v.add_argument("b", nargs="?", help="[FORMAT:]PATH[@N]: compare with A")
    v.add_argument("--atol", type=float, default=0.0, help="0 (default): bit-identical")
    v.add_argument("--weights", default="raw", choices=["raw", "ema"])
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _run(args) -> int:
    from converters import convert as api

    if args.command == "convert" and args.adapters:
        from converters import adapters

        if (args.tp, args.pp) != (1, 1) or args.dtype != "keep" or args.ema_layout or args.model:
            raise ValueError(
                "--adapters converts the adapters as they are: drop --tp/--pp/--dtype/--ema-layout/--model"
            )
        config, lora, tensors = adapters.convert(args.src, args.dst, weights=args.weights, force=args.force)
        print(f"wrote {args.dst}: {len(tensors)} adapter tensors (rank {lora.rank}, targets {','.join(lora.targets)})")
        return 0
    if args.command == "export-peft":
        from converters import adapters

        config, lora, tensors = adapters.export_peft(args.src, args.dst, weights=args.weights, force=args.force)
        print(f"wrote {args.dst}: a PEFT LoRA adapter, {len(tensors)} tensors (rank {lora.rank}, alpha {lora.alpha})")
        return 0
    if args.command == "merge":
        from converters import adapters

        config, n = adapters.merge(args.base, args.adapters, args.dst, weights=args.weights, force=args.force)
        print(f"wrote {args.dst}: {n} tensors, the adapters of {args.adapters} merged into {args.base}")
        return 0
    if args.command == "convert":
        shard = None if args.max_shard_size is None else int(args.max_shard_size * 1e9)
        r = api.convert(
            args.src,
            args.dst,
            model=args.model,
            dtype=args.dtype,
            tp=args.tp,
            pp=args.pp,
            weights=args.weights,
            force=args.force,
            progress=not args.quiet,
            max_shard_bytes=shard,
            workers=args.workers,
            ema_layout=args.ema_layout,
        )
        print(
            f"wrote {r.dst}: {r.tensors} tensors, {api.human_bytes(r.bytes_written)}, "
            f"config {api.describe_config(r.config)} [{r.config_origin}]"
        )
        if r.null_text:
            print(f"wrote {r.null_text}: the trained null caption (sampling's unconditional input)")
        elif r.dst.startswith(("release:", "megatron")) and isinstance(r.config, DiTConfig):  # not a VAE
            print("no null caption in the source: sampling without a negative prompt needs --null_text")
        return 0
    if args.command == "inspect":
        info = api.inspect(args.path, weights=args.weights)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            for k, v in info.items():
                if k == "size":
                    v = f"{api.human_bytes(v)} ({v} bytes)"
                elif k == "dtypes":
                    v = ", ".join(f"{n} x {d}" for d, n in v.items())
                print(f"{k}: {v}")
        return 0
    if args.command == "verify":
        corrupt = False
        for spec in [args.a] + ([args.b] if args.b else []):
            c = api.check_integrity(spec, weights=args.weights)
            if not c.recorded:
                print(f"{spec}: no checksums recorded (written before checksums, or by another tool)")
                if not args.b:
                    return 1
            elif c.problems:
                corrupt = True
                print(f"CORRUPT: {spec}: {len(c.problems)} problems")
                for line in c.problems[:50]:
                    print(f"  {line}")
            else:
                print(f"{spec}: checksums match ({api.human_bytes(c.bytes_checked)} checked)")
        if corrupt or not args.b:
            return 1 if corrupt else 0
        r = api.verify(args.a, args.b, atol=args.atol, weights=args.weights, progress=not args.quiet)
        mode = "bit-identical" if args.atol == 0 else f"within atol {args.atol:g}"
        if r.equal:
            print(f"equal ({mode}): {r.compared} tensors")
            return 0
        print(f"DIFFERENT ({mode}): {len(r.problems)} problems over {r.compared} compared tensors")
        for line in r.problems[:50]:
            print(f"  {line}")
        if len(r.problems) > 50:
            print(f"  … {len(r.problems) - 50} more")
        return 1
    raise AssertionError(args.command)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
