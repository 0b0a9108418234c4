"""The video VAE through `python -m converters convert` (docs/converters.md, "The VAE").

    release:vae.pt ⇄ release:vae.safetensors (⇄ a shard folder)     bit-exact, any direction
    jax:WORKDIR[@STEP] → release:vae.pt / .safetensors               a VAE training run's weights

A source is a VAE when its tensors are the VAE's (`spatial_vae.*`, `temporal_vae.*`) or when it
is a VAE training run (its checkpoint's config holds `vae_config`). The config is `--model` (a
VAE preset), the one our files store, or the preset whose schema the shapes match; the tensors
are checked strictly against `mugv.vae_config.release_vae_schema` before anything is written.
Outputs are release files: the VAE trainer starts from one (`config.init_from=vae.pt`), so there
is no weights-only VAE checkpoint to write.
"""

from __future__ import annotations

import numpy as np

from converters import pipeline
from mugv.io.atomic import atomic_output, check_output_free
from mugv.io.base import Entry, Reader, cast
from mugv.io.orbax import read_config_item, resolve_step_dir
from mugv.io.release import DEFAULT_MAX_SHARD_BYTES, ReleaseReader, ReleaseWriter, output_path
from mugv.io.spec import Spec, resolve
from mugv.schema import check_state_dict_shapes
from mugv.vae_config import VAE_PRESETS, VAEConfig, get_vae_config, release_vae_schema

VAE_PREFIXES = ("spatial_vae.", "temporal_vae.")


def is_vae(spec: Spec) -> bool:
    """Whether the checkpoint `spec` names is a video VAE (not a DiT)."""
    r = resolve(spec)
    if r.format == "release":
        with ReleaseReader(r.path) as reader:
            return any(n.startswith(VAE_PREFIXES) for n in reader.entries())
    if r.format == "jax":
        step_dir, _, _ = resolve_step_dir(r.path, r.number)
        return isinstance((read_config_item(step_dir) or {}).get("vae_config"), dict)
    return False


class RunReader(Reader):
    """A VAE training run's weights (`mugv_jax.vae.training.RunWeights`) as a Reader."""

    format = "jax"

    def __init__(self, path: str, step: int | None):
        from mugv_jax.vae.training import RunWeights

        self.path = path
        self.run = RunWeights(path, step)
        self.stored_vae_config = self.run.config
        self._entries = {name: Entry(shape, np.float32) for name, shape in self.run.shapes().items()}

    @property
    def location(self) -> str:
        return self.run.location

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def get(self, name: str) -> np.ndarray:
        return self.run.get(name)

    def describe(self) -> dict:
        return {"variant": "VAE training run", "step": self.run.step, "directory": self.run.location}


def _config(reader, model: VAEConfig | str | None) -> tuple[VAEConfig, str]:
    if model is not None:
        return get_vae_config(model), "given"
    stored = getattr(reader, "stored_vae_config", None)
    if stored is not None:
        return stored, "stored in the checkpoint"
    shapes = {n: e.shape for n, e in reader.entries().items()}
    for name, preset in VAE_PRESETS.items():
        if release_vae_schema(preset) == shapes:
            return preset, f"the {name!r} preset, detected from the tensor shapes"
    raise ValueError(
        f"{reader.location}: its VAE configuration is not stored and its shapes match no preset "
        f"({sorted(VAE_PRESETS)}); name it with --model"
    )


def open_vae(spec: Spec, model: VAEConfig | str | None = None) -> tuple[Reader, VAEConfig, str]:
    """(reader, VAEConfig, where it came from) of a VAE checkpoint, checked strictly against the
    schema of that config (the error names every missing, unexpected or mis-shaped tensor)."""
    r = resolve(spec)
    if r.format == "release":
        reader = ReleaseReader(r.path)
    elif r.format == "jax":
        reader = RunReader(r.path, r.number)
    else:
        raise ValueError(f"{spec}: {r.format} checkpoints hold DiT weights; a VAE is a release file or a training run")
    config, origin = _config(reader, model)
    found = {n: e.shape for n, e in reader.entries().items()}
    check_state_dict_shapes(found, release_vae_schema(config), reader.location)
    return reader, config, origin


def convert_vae(src: Spec, dst: Spec, *, model=None, dtype=None, force=False, max_shard_bytes=None, workers=None):
    """Write the VAE `src` as the release file(s) `dst`; returns (config, where it came from,
    tensors, bytes). `dtype` None keeps every tensor's (bit-exact)."""
    if dst.format != "release":
        raise ValueError(
            f"{dst}: a VAE is written as release files (release:vae.pt, release:vae.safetensors or a "
            f"shard folder); the VAE trainer starts from one with config.init_from"
        )
    out = output_path(dst.path)
    check_output_free(out, force)
    reader, config, origin = open_vae(src, model)
    with reader:
        found = reader.entries()
        # Floating tensors only in a VAE; a cast keeps the 0-d `logvar` 0-d.
        entries = {n: Entry(found[n].shape, dtype or found[n].dtype) for n in release_vae_schema(config)}
        workers = pipeline.default_workers() if workers is None else workers
        shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        with atomic_output(out, force=force) as tmp:
            writer = ReleaseWriter(dst.path, tmp, config, entries, max_shard_bytes=shard_bytes)
            try:
                with pipeline.lean_runtime():
                    pipeline.copy_tensors(
                        ((n, (lambda n=n: reader.get(n))) for n in entries),
                        lambda name, array: writer.write(name, cast(np.asarray(array), dtype)),
                        {n: e.nbytes for n, e in entries.items()},
                        workers=workers,
                    )
                writer.check_complete()
                writer.finish()
            except BaseException:
                writer.abort()
                raise
    return config, origin, len(entries), sum(e.nbytes for e in entries.values())
