"""How a checkpoint is named everywhere (`python -m converters`, `config.init_from`, the sampler's
and the recipes' `jax:` sources): `[FORMAT:]PATH[@N]`.

    release          dit.pt / *.safetensors / a folder of shards or its index json
    megatron         a Megatron save or iteration directory; read: torch_dist or legacy (detected),
                     written: torch_dist
    megatron-legacy  per-rank iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt
    jax              an orbax checkpoint of the JAX trainer: a workdir, its checkpoints/ or a step

Aliases: torch_dist → megatron, legacy and megatron_legacy → megatron-legacy, orbax → jax,
hf → release. `@N` is a JAX step or a Megatron iteration (newest when left out); a release
checkpoint has none. Without `FORMAT:` the format is detected from what is on disk (`resolve`).

`open_reader` opens any of them in release names (mugv/io/base.py's Reader). The legacy reader
belongs to the converters, which pass it in (`legacy=`); without it a legacy checkpoint is
refused with the conversion that makes it a release file.
"""

from __future__ import annotations

import dataclasses
import os

from mugv.io import megatron, orbax, release, torch_dist
from mugv.io.base import Reader

FORMATS = ("release", "megatron", "megatron-legacy", "jax")
ALIASES = {
    "torch_dist": "megatron",
    "legacy": "megatron-legacy",
    "megatron_legacy": "megatron-legacy",
    "orbax": "jax",
    "hf": "release",
}
# Formats that keep an EMA next to the weights (training checkpoints).
WITH_EMA = ("jax", "megatron")


@dataclasses.dataclass(frozen=True)
class Spec:
    format: str | None  # None: detect from the path
    path: str
    number: int | None = None  # step (jax) or iteration (megatron)

    def __str__(self):
        s = f"{self.format}:{self.path}" if self.format else self.path
        return s + (f"@{self.number}" if self.number is not None else "")


def parse_spec(text: str | Spec) -> Spec:
    """`[FORMAT:]PATH[@N]` → Spec (the format None when not named); a Spec is returned as it is."""
    if isinstance(text, Spec):
        return text
    fmt, path = None, text
    head, sep, rest = text.partition(":")
    if sep and (head in FORMATS or head in ALIASES):
        fmt, path = ALIASES.get(head, head), rest
    number = None
    base, at, tail = path.rpartition("@")
    if at and tail.isdigit():
        path, number = base, int(tail)
    if not path:
        raise ValueError(f"{text!r}: no path (expected [FORMAT:]PATH[@N], FORMAT one of {FORMATS})")
    if fmt == "release" and number is not None:
        raise ValueError(f"{text}: a release checkpoint has no steps or iterations; name it without @{number}")
    return Spec(fmt, os.path.expanduser(path), number)


def detect_format(path: str) -> str:
    """The format of what is at `path`: any file is release; a directory is a release shard
    folder, a JAX checkpoint, or a Megatron save/iteration directory (torch_dist: megatron,
    per-rank files: megatron-legacy)."""
    if os.path.isfile(path):
        return "release"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist")
    if release.is_shard_dir(path):
        return "release"
    if orbax.is_jax_checkpoint(path):
        return "jax"
    try:
        variant = megatron.detect_variant(path)
    except FileNotFoundError:
        raise ValueError(
            f"{path}: cannot tell the checkpoint format (not a release file or shard folder, a "
            f"JAX/orbax checkpoint, or a Megatron save directory); name it as FORMAT:PATH, FORMAT "
            f"one of {FORMATS}"
        ) from None
    return "megatron" if variant == "torch_dist" else "megatron-legacy"


def resolve(spec: str | Spec) -> Spec:
    """The spec of an existing checkpoint with its exact format: detected when not named, and
    `megatron` narrowed to `megatron-legacy` for per-rank files."""
    spec = parse_spec(spec)
    if not os.path.exists(spec.path):
        raise FileNotFoundError(f"{spec.path} does not exist")
    fmt = spec.format or detect_format(spec.path)
    if fmt == "megatron" and megatron.detect_variant(spec.path) == "legacy":
        fmt = "megatron-legacy"
    if fmt == "release" and spec.number is not None:
        raise ValueError(f"{spec}: a release checkpoint has no steps or iterations; name it without @{spec.number}")
    return dataclasses.replace(spec, format=fmt)


def open_reader(spec: str | Spec, *, weights: str = "raw", legacy=None) -> Reader:
    """A reader of the checkpoint `spec` in release names; `weights="ema"` reads a training
    checkpoint's EMA. `legacy`: the reader class of per-rank Megatron files (the converters')."""
    given = parse_spec(spec)
    if weights not in ("raw", "ema"):
        raise ValueError(f"{given}: --weights must be raw or ema, got {weights!r}")
    spec = resolve(given)
    if weights != "raw" and spec.format not in WITH_EMA:
        raise ValueError(
            f"{given}: --weights {weights} needs a JAX or Megatron torch_dist training checkpoint "
            f"(the {spec.format} format holds one set of weights)"
            if spec.format != "megatron-legacy"
            else f"{given}: --weights {weights} needs a torch_dist training checkpoint "
            f"(legacy mp_rank_* checkpoints hold one set of weights)"
        )
    if spec.format == "release":
        return release.ReleaseReader(spec.path)
    if spec.format == "jax":
        return orbax.JaxReader(spec.path, spec.number, weights)
    if spec.format == "megatron":
        return torch_dist.TorchDistReader(spec.path, spec.number, weights)
    if legacy is None:
        raise ValueError(
            f"{given} is a legacy Megatron checkpoint (mp_rank_* files), which only the converters "
            f"read. Convert it first: python -m converters convert --src megatron-legacy:{spec.path} "
            f"--dst release:OUT.safetensors"
        )
    return legacy(spec.path, spec.number)
