"""convert / verify / inspect: compositions of a reader and a writer, one tensor at a time.

A checkpoint is named by the one spec grammar (`mugv.io.spec`); `open_checked` opens it with the
core's reader (the legacy Megatron reader is ours, `formats/megatron.py`) and settles its config
(`detect.py`); `convert` hands the reader's jobs to a writer (`formats/`) on the pipeline's threads
(`pipeline.py`) into a temporary output (`mugv.io.atomic`). A release output also gets the
source's null caption as its sidecar (`mugv.io.null_text`): a training checkpoint's own
(`Reader.null_text`: JAX `state["null_text"]`, Megatron `context_embedder.drop_emb`), or a release
source's sidecar, copied. Legacy Megatron files and weights-only JAX checkpoints hold none.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys

import numpy as np

from converters import pipeline, vae
from converters.detect import describe_config, resolve_config
from converters.formats import make_writer, output_path
from converters.formats.megatron import LegacyReader
from mugv.config import DiTConfig, get_config
from mugv.io import null_text as null_lib
from mugv.io.atomic import atomic_output, check_output_free
from mugv.io.base import DTYPE_NAMES, Entry, cast, dtype_name
from mugv.io.spec import WITH_EMA, open_reader, parse_spec, resolve
from mugv.io.torch_dist import NULL_TEXT_KEY
from mugv.schema import release_schema

# How `--ema-layout` lays out an EMA in a torch_dist output (mugv.io.torch_dist).
EMA_LAYOUTS = ("mugv", "official")


def _progress(iterable, total: int, desc: str, enabled: bool):
    """`iterable` with a progress bar (a bar to update by hand for None)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False)


def open_any(spec, *, weights: str = "raw"):
    """A reader of the checkpoint `spec` in any format, legacy Megatron files included."""
    return open_reader(spec, weights=weights, legacy=LegacyReader)


def open_checked(spec, *, model: DiTConfig | str | None = None, weights: str = "raw"):
    """(reader, config, where the config came from), the checkpoint checked strictly against
    the release schema of that config (error names every missing/unexpected/mis-shaped tensor)."""
    reader = open_any(spec, weights=weights)
    try:
        config, origin = resolve_config(
            reader.entries(),
            model=None if model is None else get_config(model),
            stored=reader.stored_config,
            source=reader.path,
        )
    except BaseException:
        reader.close()
        raise
    # Readers that regroup heads (Megatron) use the resolved config.
    reader.layout_config = config
    return reader, config, origin


@dataclasses.dataclass
class ConvertResult:
    src: str
    dst: str
    config: DiTConfig
    config_origin: str
    tensors: int
    bytes_written: int
    # Where the source's null caption went: the release output's sidecar, or the Megatron output.
    null_text: str | None = None


def convert(
    src,
    dst,
    *,
    model: DiTConfig | str | None = None,
    dtype: str = "keep",
    tp: int = 1,
    pp: int = 1,
    weights: str = "raw",
    force: bool = False,
    progress: bool = False,
    max_shard_bytes: int | None = None,
    workers: int | None = None,
    ema_layout: str | None = None,
) -> ConvertResult:
    """Convert the checkpoint `src` into `dst` (specs "FORMAT:PATH[@N]").

    `dtype` is "keep" (bit-exact) or a floating dtype every tensor is cast to. The output is
    written under a temporary name and renamed when complete; an existing `dst` is refused
    unless `force`. A release output gets the source's trained null caption as a sidecar
    (mugv/io/null_text.py), so sampling finds it; a stale sidecar there is replaced or,
    when the source has none, removed. `workers` threads read, transform and write tensors at once
    (None: a default for this machine, 1: one tensor at a time in this thread); the output is the
    same bytes. `ema_layout` ("mugv" or "official"): a torch_dist output also carries the EMA of
    the source training checkpoint, in our layout or in the official trainer's for TP `tp` (what
    its `ema_restore.py` reads).
    """
    src, dst = parse_spec(src), parse_spec(dst)
    if vae.is_vae(src):
        out_dtype = None if dtype == "keep" else DTYPE_NAMES.get(dtype)
        if dtype != "keep" and out_dtype is None:
            raise ValueError(f"--dtype must be keep or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        if (tp, pp) != (1, 1) or weights != "raw" or ema_layout is not None:
            raise ValueError(f"{src} is a video VAE: --tp/--pp, --weights ema and --ema-layout are DiT options")
        config, origin, n, nbytes = vae.convert_vae(
            src, dst, model=model, dtype=out_dtype, force=force, max_shard_bytes=max_shard_bytes, workers=workers
        )
        return ConvertResult(str(src), str(dst), config, origin, n, nbytes)
    if ema_layout is not None:
        if ema_layout not in EMA_LAYOUTS:
            raise ValueError(f"--ema-layout must be one of {EMA_LAYOUTS}, got {ema_layout!r}")
        if dst.format != "megatron":
            raise ValueError(f"--ema-layout writes an EMA into a torch_dist output (megatron:PATH), not {dst}")
    if dtype != "keep" and dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be keep or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    out_dtype = None if dtype == "keep" else DTYPE_NAMES[dtype]
    out = output_path(dst)
    check_output_free(out, force, make_parent=True)  # a missing parent is made once the source opened
    sidecar = null_lib.sidecar_path(dst.path) if dst.format == "release" else None
    # An older-named sidecar this output would own is replaced with it too.
    legacy = null_lib.legacy_sidecar_path(dst.path) if sidecar else None
    for claimed in (sidecar, legacy):
        if claimed and os.path.lexists(claimed) and not force:
            raise FileExistsError(
                f"null-caption sidecar {claimed} of output {dst.path} already exists; pass --force to overwrite it"
            )
    reader, config, origin = open_checked(src, model=model, weights=weights)
    with reader:
        # Training and Megatron checkpoints hold their own; release weights carry theirs beside them.
        null = null_lib.find_sidecar(reader.path) if reader.format == "release" else reader.null_text()
        kept_in = "release" if sidecar else "megatron" if dst.format in ("megatron", "megatron-legacy") else None
        found = reader.entries()
        entries = {n: Entry(found[n].shape, out_dtype or found[n].dtype) for n in release_schema(config)}
        workers = pipeline.default_workers() if workers is None else workers
        ema = None
        if ema_layout is not None:
            ema_reader, _, _ = open_checked(src, model=config, weights="ema")
            ema = (ema_reader, out_dtype, ema_layout)
        with atomic_output(out, force=force, make_parent=True) as tmp, contextlib.ExitStack() as stack:
            if ema is not None:
                stack.enter_context(ema[0])
            writer = make_writer(
                dst,
                tmp,
                config,
                entries,
                tp=tp,
                pp=pp,
                max_shard_bytes=max_shard_bytes,
                workers=workers,
                null_text=null[0] if null is not None and kept_in == "megatron" else None,
                ema=ema,
            )
            try:
                desc = f"{os.path.basename(os.path.normpath(src.path))} → {dst.format}"
                bar = _progress(None, len(entries), desc, progress)
                with pipeline.lean_runtime():
                    pipeline.copy_tensors(
                        reader.jobs(),
                        lambda name, array: writer.write(name, cast(array, out_dtype)),
                        {n: e.nbytes for n, e in entries.items()},
                        workers=workers,
                        done=(lambda _: bar.update(1)) if progress else None,
                    )
                    if progress:
                        bar.close()
                    writer.check_complete()
                    writer.finish()
            except BaseException:
                writer.abort()
                raise
    if sidecar:
        if null is not None:
            null_lib.save(sidecar, null[0], source=null[1])
        elif os.path.lexists(sidecar):
            os.remove(sidecar)  # from an earlier output; it does not belong to these weights
        if legacy and os.path.lexists(legacy):
            os.remove(legacy)  # the replaced weights' older-named sidecar (refused above without --force)
    where = None
    if null is not None and kept_in == "release":
        where = sidecar
    elif null is not None and kept_in == "megatron":
        where = f"{out} ({NULL_TEXT_KEY})"
    return ConvertResult(
        str(src), str(dst), config, origin, len(entries), sum(e.nbytes for e in entries.values()), where
    )


@dataclasses.dataclass
class IntegrityResult:
    spec: str
    recorded: bool  # whether the checkpoint records checksums at all
    problems: list[str]
    bytes_checked: int


def check_integrity(spec, *, weights: str = "raw") -> IntegrityResult:
    """Every byte of the checkpoint `spec` against the checksums recorded when it was written
    (mugv.io.digest): torch_dist and JAX checkpoints, our release files and legacy rank files."""
    from mugv.io.digest import CorruptCheckpoint

    try:
        reader = open_any(spec, weights=_weights_for(spec, weights))
    except CorruptCheckpoint as e:  # the files read to open it already differ
        return IntegrityResult(str(spec), True, e.problems, 0)
    with reader:
        found = reader.integrity()
    if found is None:
        return IntegrityResult(str(spec), False, [], 0)
    return IntegrityResult(str(spec), True, found.problems, found.bytes_checked)


@dataclasses.dataclass
class VerifyResult:
    equal: bool
    compared: int
    problems: list[str]
    max_abs_diff: float


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _weights_for(spec, weights: str) -> str:
    # Only training checkpoints (JAX, Megatron torch_dist) keep an EMA; the other side of a
    # comparison has just its weights.
    return weights if resolve(spec).format in WITH_EMA else "raw"


def verify(
    a,
    b,
    *,
    atol: float = 0.0,
    weights: str = "raw",
    progress: bool = False,
    limit: int = 20,
    workers: int | None = None,
) -> VerifyResult:
    """Compare two checkpoints tensor by tensor in release names. atol 0 means bit-identical
    (same dtype, same bytes); otherwise |a - b| <= atol everywhere, dtypes may differ. Tensors
    are compared on `workers` threads; problems are listed in `a`'s tensor order."""
    ra, _, _ = open_checked(a, weights=_weights_for(a, weights))
    with ra:
        rb, _, _ = open_checked(b, weights=_weights_for(b, weights))
        with rb:
            ea, eb = ra.entries(), rb.entries()
            problems = [f"only in {ra.path}: {n}" for n in ea if n not in eb]
            problems += [f"only in {rb.path}: {n}" for n in eb if n not in ea]
            found: dict[str, tuple[str | None, float]] = {}

            def compare(name: str, x: np.ndarray) -> None:
                if name in eb:
                    found[name] = _compare(name, x, rb.get(name), atol)

            bar = _progress(None, len(ea), "verify", progress)
            with pipeline.lean_runtime():
                pipeline.copy_tensors(
                    ra.jobs(),
                    compare,
                    {n: e.nbytes for n, e in ea.items()},
                    workers=workers,
                    done=(lambda _: bar.update(1)) if progress else None,
                )
            if progress:
                bar.close()
            problems += [found[n][0] for n in ea if n in found and found[n][0]]
            worst = max((d for _, d in found.values()), default=0.0)
    return VerifyResult(not problems, len(found), problems, worst)


def _compare(name: str, x: np.ndarray, y: np.ndarray, atol: float) -> tuple[str | None, float]:
    """(problem or None, max |x - y| where computed) of one tensor."""
    if x.shape != y.shape:
        return f"{name}: shape {list(x.shape)} vs {list(y.shape)}", 0.0
    if atol == 0:
        if x.dtype != y.dtype:
            return f"{name}: dtype {dtype_name(x.dtype)} vs {dtype_name(y.dtype)}", 0.0
        if np.array_equal(_bits(x), _bits(y)):
            return None, 0.0
        diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
        return f"{name}: values differ (max |a-b| = {diff:.3g})", diff
    diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
    return (None if diff <= atol else f"{name}: max |a-b| = {diff:.3g} > atol {atol:g}"), diff


def inspect(spec, *, weights: str = "raw") -> dict:
    """Format, config, tensor count, dtypes and size of a checkpoint (no tensor data is read)."""
    spec = parse_spec(spec)
    reader = open_any(spec, weights=weights)
    with reader:
        entries = reader.entries()
        info: dict = {"path": spec.path, "format": reader.format}
        info.update(reader.describe())
        try:
            config, origin = resolve_config(entries, model=None, stored=reader.stored_config, source=reader.path)
            info["config"] = f"{describe_config(config)} [{origin}]"
        except ValueError as e:
            info["config"] = f"not usable: {e}"
        dtypes = collections.Counter(dtype_name(e.dtype) for e in entries.values())
        info["tensors"] = len(entries)
        info["parameters"] = int(sum(np.prod(e.shape, dtype=np.int64) for e in entries.values()))
        info["dtypes"] = dict(dtypes)
        info["size"] = sum(e.nbytes for e in entries.values())
    return info


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
