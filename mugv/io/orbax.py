"""JAX trainer checkpoints (orbax): the names both writers use (the JAX trainer,
mugv_jax/train/checkpointing.py, and the converters' JAX writer) and the reader, without orbax's
restore and without the JAX model.

    <workdir>/checkpoints/<step>/          a CheckpointManager directory, one step per directory
        state    the train-state pytree (StandardSave): params, opt_state, ema, null_text, step,
                 rng, nonfinite, skipped (and frozen: the weights that do not train, whose
                 params and ema then hold only what trains); params/ema are nested dicts keyed by the JAX layout's
                 dotted paths (mugv/layouts/jax.py). A converters output holds params and ema only.
        data     the data iterator's JSON state (position); trainer checkpoints only
        config   JSON, the model's DiTConfig under "model" (a trainer's: the whole run config)

    mugv_digests.json  the step's digest table (mugv.io.digest: every file, written once the
                       step is complete); readers check it before reading

`resolve_step_dir` finds a step (newest unless asked) from a manager dir, its workdir or a step
dir. `StoredParams` opens `state/params` (or `state/ema`) array by array with tensorstore;
`JaxReader` serves them in release names, one layer at a time. orbax and tensorstore (and with
orbax, jax) are imported inside the functions that open arrays.
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np

from mugv.config import DiTConfig
from mugv.io import digest
from mugv.io.atomic import write_text
from mugv.io.base import Entry, Reader
from mugv.io.staging import RawStore
from mugv.layouts import jax as jax_layout
from mugv.schema import detect_config, release_schema

# A trainer's <workdir>/checkpoints.
WORKDIR_CHECKPOINTS = "checkpoints"
# The items of one step.
STATE, DATA, CONFIG = "state", "data", "config"
TRAINER_ITEMS = (STATE, DATA, CONFIG)
WEIGHTS_ITEMS = (STATE, CONFIG)
# Entries of the state item read here.
PARAMS, EMA, NULL_TEXT = "params", "ema", "null_text"
# Weights that do not train (config.freeze, LoRA's base): beside params, with no EMA of their own.
FROZEN = "frozen"
# Where the config item holds the model's DiTConfig.
MODEL = "model"
# Files orbax writes: a PyTree item's metadata, a JSON item's content.
_TREE_METADATA, _JSON_ITEM = "_METADATA", "metadata"
# The step's digest table, beside its items.
DIGESTS_FILE = "mugv_digests.json"


def write_digests(step_dir: str) -> dict:
    """Record the digest table of a complete step (every file under it)."""
    files = digest.all_files(step_dir, exclude=lambda rel: rel == DIGESTS_FILE)
    table = digest.compute(step_dir, files, workers=digest.default_workers())
    write_text(os.path.join(step_dir, DIGESTS_FILE), digest.dumps(table))
    return table


def read_digests(step_dir: str) -> dict | None:
    """The step's digest table; None when it has none (written before checksums, or killed
    between publishing the step and recording its table); an unreadable table is corruption."""
    path = os.path.join(step_dir, DIGESTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return digest.loads(f.read().decode("utf-8", "replace"), path)


def verify(step_dir: str, *, files_only: bool = False) -> digest.Check | None:
    """Every byte of a step against its digest table; None when it has none."""
    table = read_digests(step_dir)
    if table is None:
        return None
    return digest.check(step_dir, table, workers=digest.default_workers(), files_only=files_only)


def check_digests(step_dir: str) -> None:
    """Raise CorruptCheckpoint naming every file of the step that differs from its table."""
    found = verify(step_dir)
    if found is not None and not found.ok:
        raise digest.CorruptCheckpoint(step_dir, found.problems)


def stored_run_config(step_dir: str) -> dict | None:
    """The step's config item (the run config, the model under MODEL), None without one."""
    path = os.path.join(step_dir, CONFIG, _JSON_ITEM)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def config_item(config: DiTConfig, run_config: dict | None = None) -> dict:
    """The config item: the run config (a trainer's; none for weights only) with the model's
    DiTConfig under `MODEL`, where readers take it instead of detecting it."""
    return {**(run_config or {}), MODEL: config.to_dict()}


def _steps(manager_dir: str) -> list[int]:
    if not os.path.isdir(manager_dir):
        return []
    # Orbax writes a step under a temporary name and renames it when complete: a plain number
    # is a finished step.
    return sorted(
        int(n) for n in os.listdir(manager_dir) if n.isdigit() and os.path.isdir(os.path.join(manager_dir, n, STATE))
    )


def _is_step_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE, _TREE_METADATA))


def is_jax_checkpoint(path: str) -> bool:
    return _is_step_dir(path) or bool(_steps(path)) or bool(_steps(os.path.join(path, WORKDIR_CHECKPOINTS)))


def resolve_step_dir(path: str, step: int | None) -> tuple[str, int | None, list[int]]:
    """(step directory, step, all steps) for a manager dir, a workdir, or a step dir."""
    if _is_step_dir(path):
        base = os.path.basename(os.path.normpath(path))
        return path, (int(base) if base.isdigit() else None), []
    manager = path
    if not _steps(path) and _steps(os.path.join(path, WORKDIR_CHECKPOINTS)):
        manager = os.path.join(path, WORKDIR_CHECKPOINTS)
    steps = _steps(manager)
    if not steps:
        raise FileNotFoundError(f"{path}: no orbax checkpoint (no <step>/{STATE} directory)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{path}: no step {step} (steps present: {steps})")
    return os.path.join(manager, str(step)), step, steps


def read_config_item(step_dir: str) -> dict | None:
    """The JSON config item of a step (a trainer's run config, or `{"model": …}`), None without one."""
    config_file = os.path.join(step_dir, CONFIG, _JSON_ITEM)
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        return json.load(f)


def config_from_jax_shapes(shapes: dict[str, tuple], source: str) -> DiTConfig:
    """Detect the config from JAX-layout shapes via the release-name detector."""
    need = {
        "x_embedder.kernel",
        "blocks.attn.q_norm.scale",
        "blocks.mlp.fc1.kernel",
        "y_embedder.fc1.kernel",
        "t_embedder.fc1.kernel",
        "final_layer.linear.kernel",
    }
    missing = sorted(need - set(shapes))
    if missing:
        raise ValueError(f"{source}: cannot detect the model configuration, no {missing}")
    kt, kh, kw, cin, c = shapes["x_embedder.kernel"]
    depth, d = shapes["blocks.attn.q_norm.scale"]
    f = shapes["blocks.mlp.fc1.kernel"][2]
    release = {
        "x_embedder.proj.weight": (c, cin, kt, kh, kw),
        "blocks.0.attn.q_norm.weight": (d,),
        f"blocks.{depth - 1}.attn.q_norm.weight": (d,),
        "blocks.0.mlp.fc1.weight": (f, c),
        "y_embedder.y_proj.fc1.weight": tuple(reversed(shapes["y_embedder.fc1.kernel"])),
        "t_embedder.mlp.0.weight": tuple(reversed(shapes["t_embedder.fc1.kernel"])),
        "final_layer.linear.weight": tuple(reversed(shapes["final_layer.linear.kernel"])),
    }
    return detect_config(release)


def _state_metadata(state_dir: str) -> dict:
    with open(os.path.join(state_dir, _TREE_METADATA)) as f:
        return json.load(f)


def state_entries(state_dir: str) -> list[tuple[str, ...]]:
    """The key path of every leaf of a saved state item (`("params", "blocks", …)`), from its
    metadata alone."""
    return [ast.literal_eval(k) for k in _state_metadata(state_dir)["tree_metadata"]]


def state_leaves(state_dir: str) -> list[tuple[str, ...]]:
    """The key paths of the values a saved state item holds (its empty nodes left out)."""
    tree = _state_metadata(state_dir)["tree_metadata"]
    return [
        ast.literal_eval(k)
        for k, v in tree.items()
        if not (v.get("value_metadata") or {}).get("skip_deserialize", False)
    ]


def open_state_arrays(state_dir: str, names: list[str]) -> dict:
    """{dotted leaf name: tensorstore array, opened but not read} of a saved state item, with
    orbax's own read spec and context (OCDBT or not, zarr v2 or v3, as the metadata says)."""
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    meta = _state_metadata(state_dir)
    use_ocdbt, use_zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", False))
    context = ts_utils.get_ts_context(use_ocdbt=use_ocdbt)
    out = {}
    for name in names:
        spec = ts_utils.ArrayReadSpec(state_dir, name, use_zarr3, use_ocdbt=use_ocdbt)
        out[name] = ts.open(spec.json, context=context).result()
    return out


class StoredParams:
    """The params (weights="raw") or EMA (weights="ema") arrays of one checkpoint step, opened
    with tensorstore (orbax's own read spec and context) and not yet read: `arrays` maps each
    JAX path to its array. `config` is the stored model config, else detected from the shapes;
    shapes that disagree with it raise, naming every mismatched array."""

    def __init__(self, path: str, step: int | None = None, weights: str = "raw"):
        if weights not in ("raw", "ema"):
            raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
        self.path, self.weights = path, weights
        self.step_dir, self.step, self.steps = resolve_step_dir(path, step)
        self.state_dir = os.path.join(self.step_dir, STATE)
        check_digests(self.step_dir)
        tree = state_entries(self.state_dir)
        self.state_keys = sorted({k[0] for k in tree})
        self.root = PARAMS if weights == "raw" else EMA
        paths = [".".join(k[1:]) for k in tree if k[0] == self.root]
        if not paths:
            raise ValueError(f"{self.step_dir}: the state holds no {self.root!r} (entries: {self.state_keys})")
        if any(p.rsplit(".", 1)[-1] in jax_layout.LORA_KEYS for p in paths):
            raise ValueError(
                f"{self.step_dir} is a LoRA run: its {self.root} are adapters of a frozen base. Merge them into "
                f"the base with `python -m converters merge --base BASE --adapters jax:{path}` or export them "
                f"with `python -m converters export-peft --src jax:{path}`"
            )
        # A run with config.freeze keeps the frozen modules apart (`frozen`: no EMA of their own, as
        # they do not change); they complete both the raw weights and the EMA.
        frozen = [".".join(k[1:]) for k in tree if k[0] == FROZEN]
        names = [f"{self.root}.{p}" for p in paths] + [f"{FROZEN}.{p}" for p in frozen]
        opened = open_state_arrays(self.state_dir, names)
        self.arrays = {p: opened[f"{self.root}.{p}"] for p in paths}
        self.arrays.update({p: opened[f"{FROZEN}.{p}"] for p in frozen})
        shapes = {p: tuple(a.shape) for p, a in self.arrays.items()}
        self.stored_config = None
        model = (read_config_item(self.step_dir) or {}).get(MODEL)
        if isinstance(model, dict):
            self.stored_config = DiTConfig.from_dict(model)
        self.config = self.stored_config or config_from_jax_shapes(shapes, self.step_dir)
        want = jax_layout.jax_param_shapes(self.config)
        bad = [
            f"{p}: {list(s)} in checkpoint, model expects {list(want[p])}"
            for p, s in shapes.items()
            if p in want and tuple(want[p]) != s
        ]
        if bad:
            raise ValueError(f"{self.step_dir} ({self.root}) does not match the model schema:\n  " + "\n  ".join(bad))

    def _complete(self) -> dict[str, tuple]:
        """The model's JAX shapes, once the stored arrays are checked to be exactly those."""
        want = jax_layout.jax_param_shapes(self.config)
        missing = sorted(set(want) - set(self.arrays))
        unexpected = sorted(set(self.arrays) - set(want))
        if missing or unexpected:
            raise ValueError(
                f"{self.step_dir}: {self.weights} weights do not match the model: "
                f"missing {missing}, unexpected {unexpected}"
            )
        return want

    def read_flat(self) -> dict[str, np.ndarray]:
        """{JAX path: float32 array} (the whole model in memory, as a model needs); the set of
        arrays must be exactly the model's."""
        want = self._complete()
        return {p: np.asarray(self.arrays[p].read().result(), np.float32) for p in want}

    def release_items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(release name, array in its stored dtype) for every tensor, one JAX array read at a
        time (the whole stack of a layer tensor, then its layers); the set of arrays must be
        exactly the model's."""
        want = self._complete()
        for p in want:
            yield from jax_layout.jax_to_release_all({p: self.arrays[p].read().result()}, self.config)


class JaxReader(Reader):
    """The params (or EMA) of one step in release names. Several reads are in flight at once
    (tensorstore reads and decodes on its own threads), one layer of a stacked array each. If the
    stored chunks span several layers (the trainer writes one chunk per device shard, layers
    included), that array is first copied chunk by chunk into a raw staging file (under $TMPDIR),
    which bounds memory by one storage chunk (orbax caps chunks at 2 GiB) rather than by the
    array."""

    format = "jax"

    def __init__(self, path: str, step: int | None = None, weights: str = "raw"):
        stored = self._stored = StoredParams(path, step, weights)
        self.path, self.weights = path, weights
        self.step_dir, self.step, self.steps = stored.step_dir, stored.step, stored.steps
        self.stored_config = stored.stored_config
        self._arrays = stored.arrays
        config = self.layout_config = stored.config
        want = jax_layout.jax_param_shapes(config)
        schema = release_schema(config)
        self._src: dict[str, tuple[str, int | None]] = {}
        self._entries: dict[str, Entry] = {}
        for p, a in self._arrays.items():
            dtype = np.dtype(a.dtype.numpy_dtype)
            if p not in want:
                # Reported as unexpected by the strict schema check.
                self._src[f"{stored.root}.{p}"] = (p, None)
                self._entries[f"{stored.root}.{p}"] = Entry(a.shape, dtype)
                continue
            layers = range(a.shape[0]) if jax_layout.is_stacked(p) else [None]
            for layer in layers:
                name = jax_layout.release_name_of(p, layer)
                self._src[name] = (p, layer)
                self._entries[name] = Entry(schema[name], dtype)

    @property
    def location(self) -> str:
        return self.step_dir

    def integrity(self) -> digest.Check | None:
        return verify(self.step_dir)

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def _to_release(self, path: str, layer: int | None, array: np.ndarray) -> tuple[str, np.ndarray]:
        return jax_layout.jax_to_release(path, array, self.layout_config, layer=layer)

    def get(self, name: str) -> np.ndarray:
        if name not in self._src:
            raise KeyError(f"{self.step_dir}: no tensor {name!r}")
        path, layer = self._src[name]
        a = self._arrays[path]
        data = a.read().result() if layer is None else a[layer].read().result()
        return self._to_release(path, layer, data)[1]

    def _checked_arrays(self):
        want = jax_layout.jax_param_shapes(self.layout_config)
        for path, a in self._arrays.items():
            if path not in want:
                raise KeyError(f"{self.step_dir}: unexpected parameter {path}")
            yield path, a

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name, read in self.jobs():
            yield name, read()

    def jobs(self) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        # Each read starts in tensorstore when the job is taken; the transform runs on the
        # pipeline's thread that waits for it.
        for path, a in self._checked_arrays():
            if not jax_layout.is_stacked(path):
                yield jax_layout.release_name_of(path), partial(self._finish, path, None, a.read())
            elif a.chunk_layout.read_chunk.shape[0] == 1:
                for i in range(a.shape[0]):
                    yield jax_layout.release_name_of(path, i), partial(self._finish, path, i, a[i].read())
            else:
                for name, array in self._staged_layers(path, a):
                    yield name, (lambda x=array: x)

    def read_all(self) -> dict[str, np.ndarray]:
        # The whole model is wanted in memory: each array read whole, no staging.
        return dict(self._stored.release_items())

    def null_text(self) -> tuple[np.ndarray, str] | None:
        if NULL_TEXT not in self._stored.state_keys:
            return None
        (array,) = open_state_arrays(self._stored.state_dir, [NULL_TEXT]).values()
        return np.asarray(array.read().result(), np.float32), f"jax:{self.step_dir} {STATE}[{NULL_TEXT!r}]"

    def _finish(self, path: str, layer: int | None, future) -> np.ndarray:
        return self._to_release(path, layer, future.result())[1]

    def _staged_layers(self, path: str, a) -> Iterator[tuple[str, np.ndarray]]:
        # Reading layer by layer would decode every chunk once per layer; copy each chunk once.
        chunk = tuple(a.chunk_layout.read_chunk.shape)
        store = RawStore(tempfile.mkdtemp(prefix="mugv-convert-"))
        try:
            store.create(path, tuple(a.shape), np.dtype(a.dtype.numpy_dtype))
            grid = [range(0, n, c) for n, c in zip(a.shape, chunk)]
            for starts in np.ndindex(*[len(g) for g in grid]):
                region = tuple(slice(g[i], min(g[i] + c, n)) for g, i, c, n in zip(grid, starts, chunk, a.shape))
                store.write_region(path, region, a[region].read().result())
            for i in range(a.shape[0]):
                yield self._to_release(path, i, store.read(path, i))
        finally:
            store.close()

    def describe(self) -> dict:
        d = {
            "step directory": self.step_dir,
            "step": self.step,
            "weights": self.weights,
            "state entries": self._stored.state_keys,
        }
        if self.steps:
            d["steps present"] = self.steps
        return d
