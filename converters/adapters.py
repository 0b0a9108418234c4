"""LoRA adapters as a format: read them from a run of either backend, write adapter-only
checkpoints, export them to PEFT and merge them into a release file.

    read(spec)        (model config, LoraConfig, release-named float32 adapters) of
                      jax:RUN[@STEP] (a trainer's orbax state, or an adapter-only one),
                      megatron:RUN[@ITER] (a trainer's torch_dist checkpoint, or adapter-only) or
                      a PEFT directory (mugv/io/peft.py; then the model is given)
    write(spec, …)    an adapter-only checkpoint: jax:DIR (orbax, `state.params` and `.ema` hold
                      the adapters in the JAX layout) or megatron:DIR (torch_dist, the adapters'
                      Megatron entries); the run config's `lora` section beside the model in both
                      (the orbax config item; common.pt's `mugv.config`), where a trainer's
                      checkpoint keeps it too
    merge(…)          a release file of base + scale·B·A, streamed one base tensor at a time

Adapter tensors are the trainer's own float32 values: every conversion is bit-exact.
"""

from __future__ import annotations

import os

import numpy as np

from mugv.config import DiTConfig
from mugv.io import null_text as null_lib
from mugv.io import orbax as orbax_layout
from mugv.io import peft
from mugv.io.atomic import atomic_output, check_output_free
from mugv.io.base import Entry
from mugv.io.spec import parse_spec, resolve
from mugv.layouts import jax as jax_layout
from mugv.lora import LoraConfig, check_adapters, merge_release, stored

# Where a checkpoint's run config keeps the LoRA section (RunConfig.lora; mugv.lora.stored reads it).
LORA = "lora"


def _lora_of(run_config: dict | None, where: str) -> LoraConfig:
    lora, _ = stored(run_config)
    if not lora.on:
        raise ValueError(f"{where}: not a LoRA run (its config has lora.rank 0): there are no adapters to read")
    return lora


def _checked(adapters: dict, config: DiTConfig, lora: LoraConfig, where: str) -> dict[str, np.ndarray]:
    check_adapters(where, adapters, config, lora)
    return {k: np.asarray(v, np.float32) for k, v in adapters.items()}


def _read_jax(path: str, step: int | None, weights: str):
    step_dir, _, _ = orbax_layout.resolve_step_dir(path, step)
    orbax_layout.check_digests(step_dir)
    run_config = orbax_layout.stored_run_config(step_dir) or {}
    model = run_config.get(orbax_layout.MODEL)
    if not isinstance(model, dict):
        raise ValueError(f"{step_dir}: no model config in its config item (not written by mugv)")
    config, lora = DiTConfig.from_dict(model), _lora_of(run_config, step_dir)
    state_dir = os.path.join(step_dir, orbax_layout.STATE)
    root = orbax_layout.PARAMS if weights == "raw" else orbax_layout.EMA
    names = [
        ".".join(k) for k in orbax_layout.state_leaves(state_dir) if k[0] == root and k[-1] in jax_layout.LORA_KEYS
    ]
    arrays = orbax_layout.open_state_arrays(state_dir, names)
    flat = {n.split(".", 1)[1]: np.asarray(a.read().result()) for n, a in arrays.items()}
    adapters = jax_layout.adapters_to_release(jax_layout.unflatten(flat))
    return config, lora, _checked(adapters, config, lora, f"{step_dir} ({root})")


def _read_megatron(path: str, iteration: int | None, weights: str):
    from mugv.io.megatron import MegatronFile
    from mugv.io.torch_dist import COMMON_FILE, TorchDistReader

    reader = TorchDistReader(path, iteration, weights)
    with reader:
        common = os.path.join(reader.dir, COMMON_FILE)
        mugv = MegatronFile(common).obj.get("mugv", {}) if os.path.isfile(common) else {}
        if not isinstance(mugv.get("model"), dict):
            raise ValueError(f"{reader.dir}: no model config in {COMMON_FILE} (not written by mugv)")
        config, lora = DiTConfig.from_dict(mugv["model"]), _lora_of(mugv.get("config"), reader.dir)
        adapters = {n: np.asarray(reader.get(n)) for n in reader.entries() if ".lora_" in n}
    return config, lora, _checked(adapters, config, lora, f"{reader.dir} ({weights})")


def _is_peft(spec: str) -> bool:
    return os.path.isfile(os.path.join(parse_spec(spec).path, peft.CONFIG))


def _run_null_text(spec: str) -> tuple[np.ndarray, str] | None:
    """The null caption a training run of either backend dropped captions to (None: an
    adapter-only checkpoint, which holds none)."""
    found = resolve(parse_spec(spec))
    if found.format == "megatron":
        from mugv.io.torch_dist import TorchDistReader

        with TorchDistReader(found.path, found.number) as reader:
            return reader.null_text()
    step_dir, _, _ = orbax_layout.resolve_step_dir(found.path, found.number)
    state_dir = os.path.join(step_dir, orbax_layout.STATE)
    if (orbax_layout.NULL_TEXT,) not in orbax_layout.state_leaves(state_dir):
        return None
    arr = orbax_layout.open_state_arrays(state_dir, [orbax_layout.NULL_TEXT])[orbax_layout.NULL_TEXT]
    return np.asarray(arr.read().result(), np.float32), f"jax:{step_dir} {orbax_layout.NULL_TEXT}"


def read(spec: str, *, weights: str = "raw", model: DiTConfig | None = None):
    """(model config, LoraConfig, {release-style name: float32 adapter}) of `spec`: jax:…,
    megatron:… (a training run's `weights`, "raw" or "ema", or an adapter-only checkpoint) or a
    PEFT directory (`model` then names the model it adapts)."""
    if _is_peft(spec):
        if model is None:
            raise ValueError(f"{spec} is a PEFT adapter: name the model it adapts (--model, or the base checkpoint)")
        lora, adapters = peft.read(parse_spec(spec).path, model)
        return model, lora, adapters
    found = resolve(parse_spec(spec))
    if found.format == "jax":
        config, lora, adapters = _read_jax(found.path, found.number, weights)
    elif found.format == "megatron":
        config, lora, adapters = _read_megatron(found.path, found.number, weights)
    else:
        raise ValueError(
            f"{spec}: adapters are read from jax:RUN, megatron:RUN (training runs or adapter-only "
            f"checkpoints) or a PEFT directory, not a {found.format} checkpoint"
        )
    if model is not None and model != config:
        raise ValueError(f"{spec} adapts a {config} model, the base is {model}")
    return config, lora, adapters


def _write_jax(path: str, step: int, config: DiTConfig, lora: LoraConfig, adapters: dict, force: bool) -> None:
    import orbax.checkpoint as ocp

    nested = jax_layout.adapters_from_release(adapters, config)
    with atomic_output(path, force=force, make_parent=True) as tmp:
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        manager = ocp.CheckpointManager(tmp, options=options, item_names=orbax_layout.WEIGHTS_ITEMS)
        items = {
            orbax_layout.STATE: ocp.args.StandardSave({orbax_layout.PARAMS: nested, orbax_layout.EMA: nested}),
            orbax_layout.CONFIG: ocp.args.JsonSave({**orbax_layout.config_item(config), LORA: _lora_dict(lora)}),
        }
        manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
        manager.close()
        orbax_layout.write_digests(os.path.join(tmp, str(step)))


def _write_megatron(spec, config: DiTConfig, lora: LoraConfig, adapters: dict, force: bool) -> None:
    from converters.formats import make_writer

    entries = {n: Entry(tuple(a.shape), np.dtype(np.float32)) for n, a in adapters.items()}
    with atomic_output(spec.path, force=force, make_parent=True) as tmp:
        writer = make_writer(spec, tmp, config, entries, common={"config": {LORA: _lora_dict(lora)}})
        try:
            for name in sorted(adapters):
                writer.write(name, adapters[name])
            writer.check_complete()
            writer.finish()
        except BaseException:
            writer.abort()
            raise


def _lora_dict(lora: LoraConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(lora)


def write(spec: str, config: DiTConfig, lora: LoraConfig, adapters: dict, *, force: bool = False) -> str:
    """An adapter-only checkpoint of `adapters` at `spec` (jax:DIR[@STEP] or megatron:DIR[@ITER]),
    written under a temporary name and renamed when complete."""
    dst = parse_spec(spec)
    adapters = _checked(adapters, config, lora, str(dst))
    if dst.format == "jax":
        _write_jax(dst.path, 0 if dst.number is None else dst.number, config, lora, adapters, force)
    elif dst.format == "megatron":
        _write_megatron(dst, config, lora, adapters, force)
    else:
        raise ValueError(
            f"--adapters writes jax:DIR or megatron:DIR (PEFT: python -m converters export-peft), not {spec}"
        )
    return dst.path


def convert(src: str, dst: str, *, weights: str = "raw", force: bool = False):
    """`convert --adapters`: the adapters of `src` as an adapter-only checkpoint at `dst`."""
    check_output_free(parse_spec(dst).path, force, make_parent=True)
    config, lora, adapters = read(src, weights=weights)
    write(dst, config, lora, adapters, force=force)
    return config, lora, adapters


def export_peft(src: str, dst: str, *, weights: str = "raw", force: bool = False):
    """The adapters of a run (or adapter-only checkpoint) `src` as a PEFT adapter directory."""
    check_output_free(dst, force, make_parent=True)
    config, lora, adapters = read(src, weights=weights)
    peft.write(dst, adapters, lora, config, force=force)
    return config, lora, adapters


def merge(base: str, adapters_src: str, dst: str, *, weights: str = "raw", force: bool = False):
    """A release file (`dst`, release:PATH or a path) of the base checkpoint `base` with the
    adapters of `adapters_src` folded in (W + scale·B·A), one base tensor at a time. The sidecar
    null caption is the adapters' run's (the one its captions were dropped to) when they come from
    a training run, else the base's. Returns (config, number of tensors)."""
    from converters.convert import open_checked
    from converters.formats import make_writer, output_path
    from mugv.schema import release_schema

    out_spec = parse_spec(dst)
    if out_spec.format is None:
        out_spec = parse_spec(f"release:{dst}")
    if out_spec.format != "release":
        raise ValueError(f"--dst {dst}: a merge writes a release file (release:PATH)")
    out = output_path(out_spec)
    check_output_free(out, force, make_parent=True)
    sidecar = null_lib.sidecar_path(out_spec.path)
    if os.path.lexists(sidecar) and not force:
        raise FileExistsError(f"null-caption sidecar {sidecar} of output {out} already exists; pass --force")
    reader, config, _ = open_checked(base)
    with reader:
        _, lora, adapters = read(adapters_src, weights=weights, model=config)
        null = None if _is_peft(adapters_src) else _run_null_text(adapters_src)
        if null is None:
            null = null_lib.find_sidecar(reader.path) if reader.format == "release" else reader.null_text()
        found = reader.entries()
        entries = {n: Entry(found[n].shape, found[n].dtype) for n in release_schema(config)}
        with atomic_output(out, force=force, make_parent=True) as tmp:
            writer = make_writer(out_spec, tmp, config, entries)
            try:
                for name, tensor in merge_release(reader.items(), adapters, lora):
                    writer.write(name, np.asarray(tensor))
                writer.check_complete()
                writer.finish()
            except BaseException:
                writer.abort()
                raise
    if null is not None:
        null_lib.save(sidecar, null[0], source=null[1])
    return config, len(entries)
