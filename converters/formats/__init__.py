"""The writers of every format, by spec (`mugv.io.spec`: `FORMAT:PATH[@N]`); reading is the
core's `mugv.io.spec.open_reader` (with the legacy reader of `formats/megatron.py`).

    release          `mugv.io.release.ReleaseWriter`: one file by suffix, or shards for a folder
    megatron         torch_dist (`formats/megatron.py`), honours --tp/--pp only as checks
    megatron-legacy  per-rank files (`formats/megatron.py`), split over --tp/--pp
    jax              an orbax CheckpointManager directory (`formats/jax.py`)

Without `@N` step 0 / iteration 1 is written.
"""

from __future__ import annotations

from mugv.io.base import Entry, Writer
from mugv.io.release import DEFAULT_MAX_SHARD_BYTES, ReleaseWriter
from mugv.io.release import output_path as release_output
from mugv.io.spec import FORMATS, Spec


def output_path(spec: Spec) -> str:
    """The file or directory a writer for `spec` creates (renamed into place when complete)."""
    return release_output(spec.path) if spec.format == "release" else spec.path


def make_writer(
    spec: Spec,
    tmp: str,
    config,
    entries: dict[str, Entry],
    *,
    tp: int = 1,
    pp: int = 1,
    max_shard_bytes: int | None = None,
    workers: int = 1,
    null_text=None,
    ema=None,
    common: dict | None = None,
) -> Writer:
    """A writer for `spec` into `tmp`; `workers` is how many threads (processes for torch_dist)
    its own flush may use. `null_text`: the source's null caption, which the Megatron formats keep
    as `context_embedder.drop_emb` (release outputs get a sidecar, written by the caller). `ema`:
    (reader, dtype, layout) of an EMA a torch_dist output carries next to the weights. `common`:
    entries a torch_dist output adds to common.pt's `mugv` (an adapter-only checkpoint's lora)."""
    fmt = spec.format
    if fmt is None:
        raise ValueError(f"{spec.path}: name the output format (FORMAT:PATH, one of {FORMATS})")
    if fmt != "megatron-legacy" and fmt != "megatron" and (tp, pp) != (1, 1):
        raise ValueError(f"--tp/--pp apply to Megatron outputs, not {fmt}")
    if fmt == "release":
        max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        return ReleaseWriter(spec.path, tmp, config, entries, max_shard_bytes=max_shard_bytes)
    if fmt in ("megatron", "megatron-legacy"):
        from converters.formats.megatron import DEFAULT_ITERATION, LegacyWriter, TorchDistWriter

        iteration = spec.number if spec.number is not None else DEFAULT_ITERATION
        if fmt == "megatron":
            return TorchDistWriter(
                spec.path,
                tmp,
                config,
                entries,
                tp=tp,
                pp=pp,
                write_processes=workers,
                iteration=iteration,
                null_text=null_text,
                ema=ema,
                common=common,
            )
        return LegacyWriter(spec.path, tmp, config, entries, tp=tp, pp=pp, iteration=iteration, null_text=null_text)
    if fmt == "jax":
        from converters.formats.jax import DEFAULT_STEP, JaxWriter

        step = spec.number if spec.number is not None else DEFAULT_STEP
        return JaxWriter(spec.path, tmp, config, entries, workers=workers, step=step)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
