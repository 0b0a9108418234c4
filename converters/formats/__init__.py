"""Checkpoint formats: `FORMAT:PATH[@N]` specs, format detection, reader and writer factories.

    release          dit.pt / *.safetensors / a folder (or index json) of shards
    megatron         read: torch_dist or legacy (detected); write: torch_dist
    megatron-legacy  per-rank iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt (honours --tp/--pp)
    jax              orbax CheckpointManager directory of the JAX trainer

`@N` is the step (jax) or iteration (megatron); without it the newest is read and step 0 /
iteration 1 is written.
"""

from __future__ import annotations

import dataclasses
import os

from mugv.io.base import Entry, Reader, Writer

FORMATS = ("release", "megatron", "megatron-legacy", "jax")
_ALIASES = {
    "torch_dist": "megatron",
    "legacy": "megatron-legacy",
    "megatron_legacy": "megatron-legacy",
    "orbax": "jax",
    "hf": "release",
}


@dataclasses.dataclass(frozen=True)
class Spec:
    format: str | None  # None: detect from the path
    path: str
    number: int | None = None  # step (jax) or iteration (megatron)

    def __str__(self):
        s = f"{self.format}:{self.path}" if self.format else self.path
        return s + (f"@{self.number}" if self.number is not None else "")


def parse_spec(text: str) -> Spec:
    fmt, path = None, text
    head, sep, rest = text.partition(":")
    if sep and (head in FORMATS or head in _ALIASES):
        fmt, path = _ALIASES.get(head, head), rest
    number = None
    base, at, tail = path.rpartition("@")
    if at and tail.isdigit():
        path, number = base, int(tail)
    if not path:
        raise ValueError(f"{text!r}: no path (expected FORMAT:PATH, FORMAT one of {FORMATS})")
    return Spec(fmt, os.path.expanduser(path), number)


def detect_format(path: str) -> str:
    from converters.formats import megatron
    from mugv.io.orbax import is_jax_checkpoint

    if os.path.isfile(path):
        return "release"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist")
    if any(n.endswith(".index.json") for n in os.listdir(path)):
        return "release"
    if is_jax_checkpoint(path):
        return "jax"
    try:
        variant = megatron.detect_variant(path)
    except FileNotFoundError:
        raise ValueError(
            f"{path}: cannot tell the checkpoint format (not a release file or "
            f"shard folder, a JAX/orbax checkpoint, or a Megatron save directory); "
            f"name it as FORMAT:PATH"
        ) from None
    return "megatron" if variant == "torch_dist" else "megatron-legacy"


def open_reader(spec: Spec | str, *, weights: str = "raw") -> Reader:
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    fmt = spec.format or detect_format(spec.path)
    if weights != "raw" and fmt not in ("jax", "megatron"):
        raise ValueError(
            f"{spec}: --weights {weights} needs a JAX or Megatron torch_dist training "
            f"checkpoint (the {fmt} format holds one set of weights)"
        )
    if not os.path.exists(spec.path):
        raise FileNotFoundError(f"{spec.path} does not exist")
    if fmt == "release":
        from mugv.io.release import ReleaseReader

        return ReleaseReader(spec.path)
    if fmt in ("megatron", "megatron-legacy"):
        from converters.formats import megatron

        variant = megatron.detect_variant(spec.path) if fmt == "megatron" else "legacy"
        if variant == "torch_dist":
            from mugv.io.torch_dist import TorchDistReader

            return TorchDistReader(spec.path, spec.number, weights)
        if weights != "raw":
            raise ValueError(
                f"{spec}: --weights {weights} needs a torch_dist training checkpoint "
                f"(legacy mp_rank_* checkpoints hold one set of weights)"
            )
        return megatron.LegacyReader(spec.path, spec.number)
    if fmt == "jax":
        from converters.formats.jax import JaxReader

        return JaxReader(spec.path, spec.number, weights)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def output_path(spec: Spec) -> str:
    """The file or directory a writer for `spec` creates (renamed into place when complete)."""
    if spec.format == "release":
        from mugv.io.release import output_path as release_output

        return release_output(spec.path)
    return spec.path


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
) -> Writer:
    """A writer for `spec` into `tmp`; `workers` is how many threads (processes for torch_dist)
    its own flush may use."""
    fmt = spec.format
    if fmt is None:
        raise ValueError(f"{spec.path}: name the output format (FORMAT:PATH, one of {FORMATS})")
    if fmt != "megatron-legacy" and fmt != "megatron" and (tp, pp) != (1, 1):
        raise ValueError(f"--tp/--pp apply to Megatron outputs, not {fmt}")
    if fmt == "release":
        from mugv.io.release import DEFAULT_MAX_SHARD_BYTES, ReleaseWriter

        return ReleaseWriter(
            spec.path, tmp, config, entries, max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        )
    iteration_or_step = spec.number
    if fmt == "megatron":
        from converters.formats import megatron

        return megatron.TorchDistWriter(
            spec.path,
            tmp,
            config,
            entries,
            tp=tp,
            pp=pp,
            write_processes=workers,
            iteration=iteration_or_step if iteration_or_step is not None else megatron.DEFAULT_ITERATION,
        )
    if fmt == "megatron-legacy":
        from converters.formats import megatron

        return megatron.LegacyWriter(
            spec.path,
            tmp,
            config,
            entries,
            tp=tp,
            pp=pp,
            iteration=iteration_or_step if iteration_or_step is not None else megatron.DEFAULT_ITERATION,
        )
    if fmt == "jax":
        from converters.formats.jax import DEFAULT_STEP, JaxWriter

        return JaxWriter(
            spec.path,
            tmp,
            config,
            entries,
            workers=workers,
            step=iteration_or_step if iteration_or_step is not None else DEFAULT_STEP,
        )
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
