"""Orbax checkpoints of the JAX trainer (mugv_jax/train/checkpointing.py), read and written per tensor.

A trainer checkpoint is `<manager dir>/<step>/` with items `state` (params and ema: nested dicts
keyed by the JAX layout's dotted paths, mugv/layouts/jax.py), `data` and `config`
({"model": DiTConfig dict}). `PATH@STEP` picks a step, else the newest.

Reading opens each array of `state/params` (or `state/ema`) with tensorstore directly
(`mugv.io.orbax.StoredParams`), so one layer of a stacked array is read at a time, and
several reads are in flight at once (tensorstore reads and decodes on its own threads). If the
stored chunks span several layers (the trainer writes one chunk per device shard, layers
included), that array is first copied chunk by chunk into a raw staging file (under $TMPDIR),
which bounds memory by one storage chunk (orbax caps chunks at 2 GiB) rather than by the array.

Writing produces a CheckpointManager directory with one step whose `state` item holds `params`
and `ema` (= params) and whose `config` item holds {"model": config}. Nothing else (no optimizer
state, step counter or data position): it is a set of weights a run initialises from, not a run
to resume. Tensors are parked as they arrive (views of a memory-mapped source as they are,
others staged on disk), then saved by orbax's StandardSave with a handler that streams each
params array into tensorstore one layer at a time, one chunk per layer, and makes each ema array
an OCDBT copy by reference of its params array.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from converters.formats.staging import RawStore
from mugv.config import DiTConfig, get_config
from mugv.io.base import Entry, Reader, Writer, file_backed
from mugv.io.orbax import StoredParams
from mugv.layouts import jax as jax_layout
from mugv.schema import release_schema
from mugv.training import unflatten

DEFAULT_STEP = 0
# Writes handed to tensorstore but not yet committed, at most (see StreamingHandler). Each holds
# its data about three times over (input, chunk, compressed); on the 1B preset 4 / 128 MiB was
# both the fastest and the smallest of 1..64 writes (docs/benchmarks.md).
_IN_FLIGHT_BYTES = 128 * 2**20
_IN_FLIGHT_WRITES = 4
# Layers read ahead of the writes, at most (beyond one per worker thread).
_READ_AHEAD_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# Names


def _tiny_release_names() -> dict[str, dict[int | None, str]]:
    """JAX path → {layer or None: release name}. Names do not depend on sizes, so a two-layer
    stand-in model gives the map for every config."""
    cfg = get_config("tiny")
    out: dict[str, dict[int | None, str]] = {}
    for path, shape in jax_layout.jax_param_shapes(cfg).items():
        if jax_layout.is_stacked(path):
            out[path] = {
                i: jax_layout.jax_to_release(path, np.zeros(shape[1:], np.float32), cfg, i)[0] for i in range(2)
            }
        else:
            out[path] = {None: jax_layout.jax_to_release(path, np.zeros(shape, np.float32), cfg)[0]}
    return out


_NAMES = _tiny_release_names()
_BLOCK = re.compile(r"^blocks\.\d+\.(.+)$")


_GLOBAL_PATHS = {names[None]: p for p, names in _NAMES.items() if None in names}
_BLOCK_PATHS = {_BLOCK.match(names[0]).group(1): p for p, names in _NAMES.items() if 0 in names}


def jax_path_of(release_name: str) -> tuple[str, int | None]:
    """(JAX path, layer or None) of a release tensor; KeyError naming it if it has none."""
    if release_name in _GLOBAL_PATHS:
        return _GLOBAL_PATHS[release_name], None
    m = re.match(r"^blocks\.(\d+)\.(.+)$", release_name)
    if m and m.group(2) in _BLOCK_PATHS:
        return _BLOCK_PATHS[m.group(2)], int(m.group(1))
    raise KeyError(f"release tensor {release_name!r} has no JAX layout counterpart")


def release_name_of(jax_path: str, layer: int | None) -> str:
    if layer is None:
        return _NAMES[jax_path][None]
    return re.sub(r"^blocks\.\d+\.", f"blocks.{layer}.", _NAMES[jax_path][0])


# ---------------------------------------------------------------------------------------------
# Reading


class JaxReader(Reader):
    format = "jax"

    def __init__(self, path: str, step: int | None = None, weights: str = "raw"):
        stored = StoredParams(path, step, weights)
        self.path, self.weights = path, weights
        self.step_dir, self.step, self.steps = stored.step_dir, stored.step, stored.steps
        self.state_dir = stored.state_dir
        self.state_keys, self.stored_config = stored.state_keys, stored.stored_config
        self._arrays = stored.arrays
        config = self.layout_config = stored.config
        root = stored.root
        want = jax_layout.jax_param_shapes(config)
        schema = release_schema(config)
        self._src: dict[str, tuple[str, int | None]] = {}
        self._entries: dict[str, Entry] = {}
        for p, a in self._arrays.items():
            dtype = np.dtype(a.dtype.numpy_dtype)
            if p not in want:
                # Reported as unexpected by the strict schema check.
                self._src[f"{root}.{p}"] = (p, None)
                self._entries[f"{root}.{p}"] = Entry(a.shape, dtype)
                continue
            layers = range(a.shape[0]) if jax_layout.is_stacked(p) else [None]
            for layer in layers:
                name = release_name_of(p, layer)
                self._src[name] = (p, layer)
                self._entries[name] = Entry(schema[name], dtype)

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

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for path, a in self._arrays.items():
            if path not in jax_layout.jax_param_shapes(self.layout_config):
                raise KeyError(f"{self.step_dir}: unexpected parameter {path}")
            if not jax_layout.is_stacked(path):
                yield self._to_release(path, None, a.read().result())
            elif a.chunk_layout.read_chunk.shape[0] == 1:
                for i in range(a.shape[0]):
                    yield self._to_release(path, i, a[i].read().result())
            else:
                yield from self._staged_layers(path, a)

    def jobs(self) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        # Each read starts in tensorstore (its own threads read and decompress) when the job is
        # taken; the transform runs on the pipeline's thread that waits for it.
        for path, a in self._arrays.items():
            if path not in jax_layout.jax_param_shapes(self.layout_config):
                raise KeyError(f"{self.step_dir}: unexpected parameter {path}")
            if not jax_layout.is_stacked(path):
                yield release_name_of(path, None), partial(self._finish, path, None, a.read())
            elif a.chunk_layout.read_chunk.shape[0] == 1:
                for i in range(a.shape[0]):
                    yield release_name_of(path, i), partial(self._finish, path, i, a[i].read())
            else:
                for name, array in self._staged_layers(path, a):
                    yield name, (lambda x=array: x)

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
            "state entries": self.state_keys,
        }
        if self.steps:
            d["steps present"] = self.steps
        return d


# ---------------------------------------------------------------------------------------------
# Writing


class _Staged(np.ndarray):
    """A zero-strided stand-in for an array parked in a RawStore (carries shape, dtype, key)."""


def _stand_in(key: str, entry: Entry) -> _Staged:
    base = np.lib.stride_tricks.as_strided(np.zeros((), entry.dtype), entry.shape, (0,) * len(entry.shape))
    out = base.view(_Staged)
    out.staged_key = key
    return out


# Orbax compresses with zstd level 1. Bit-shuffled LZ4 (blosc) compresses random-normal bf16
# weights as well (0.76 of raw vs 0.78) and encodes and decodes about twice as fast, which is most
# of a conversion's CPU time; tensorstore reads it like any zarr codec (docs/converters.md).
_FAST_CODEC = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 2}


def _use_fast_codec(tspec: dict) -> None:
    tspec = tspec.get("base", tspec)  # inside a `cast` driver when the stored dtype differs
    metadata = tspec.get("metadata", {})
    if metadata.get("compressor") is not None:  # zarr v2 (orbax's default); v3 is left alone
        metadata["compressor"] = dict(_FAST_CODEC)


@contextlib.contextmanager
def _streaming_numpy_handler(store: RawStore, workers: int = 1):
    """Route orbax's numpy-array saving through a handler that reads stand-ins from `store`.

    Orbax picks the handler from a process-global registry; it is swapped for the duration of
    one save and restored after. Its typestr stays 'np.ndarray', so the checkpoint's metadata is
    what saving real numpy arrays would give, and restores the same way.
    """
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    from orbax.checkpoint._src.serialization import type_handler_registry as registry
    from orbax.checkpoint._src.serialization.type_handlers import NumpyHandler

    class StreamingHandler(NumpyHandler):
        async def _background_serialize(self, values, infos, args=None):
            args = args or [None] * len(values)
            plain = [(v, i, a) for v, i, a in zip(values, infos, args) if not isinstance(v, _Staged)]
            if plain:
                await super()._background_serialize(*map(list, zip(*plain)))
            # Each committed write is an OCDBT manifest update; keeping a few in flight lets
            # tensorstore batch them, and the byte cap bounds the memory they hold.
            pending: collections.deque = collections.deque()
            in_flight = 0

            async def drain(max_bytes, max_count):
                nonlocal in_flight
                while pending and (in_flight > max_bytes or len(pending) > max_count):
                    future, nbytes, _ = pending.popleft()
                    await future.commit
                    in_flight -= nbytes

            async def put(target, data):
                nonlocal in_flight
                pending.append((target.write(data), data.nbytes, data))
                in_flight += data.nbytes
                await drain(_IN_FLIGHT_BYTES, _IN_FLIGHT_WRITES)

            staged = [(v, i, a) for v, i, a in zip(values, infos, args) if isinstance(v, _Staged)]
            for _, info, _ in staged:
                await info.await_path_creation()
            specs = [
                ts_utils.build_array_write_spec(
                    info=info,
                    arg=arg,
                    global_shape=tuple(value.shape),
                    # One layer per write (and so per chunk): readers can take one layer.
                    local_shape=(
                        (1, *value.shape[1:]) if jax_layout.is_stacked(value.staged_key) else tuple(value.shape)
                    ),
                    dtype=value.dtype,
                    use_ocdbt=info.is_ocdbt_checkpoint,
                    process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
                )
                for value, info, arg in staged
            ]
            for spec in specs:
                _use_fast_codec(spec.json)
            # Opening creates each array's metadata: one commit each, so all at once.
            stores = await asyncio.gather(
                *[
                    ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
                    for spec, (_, info, _) in zip(specs, staged)
                ]
            )
            # params and ema hold the same stand-ins: each layer is read (and transformed) once.
            # In one OCDBT database the other arrays holding it become copies by reference of
            # the first one's keys (its chunks and .zarray, identical for both): no second
            # encode or write, and the data is on disk once. Elsewhere each is written.
            targets: dict[str, list] = {}
            copies: list[tuple] = []
            for (value, info, _), t in zip(staged, stores):
                held = targets.setdefault(value.staged_key, [])
                if held and info.is_ocdbt_checkpoint and _copyable(held[0], t):
                    copies.append((held[0], t))
                else:
                    held.append(t)
            units = [
                (key, i)
                for key in targets
                for i in (range(store.entry(key).shape[0]) if jax_layout.is_stacked(key) else [None])
            ]
            await _write_units(units, targets, put)
            await drain(0, 0)
            for source, target in copies:
                await source.kvstore.experimental_copy_range_to(target.kvstore)

    def _copyable(source, target) -> bool:
        # Both arrays' keys under their own directory of the same database (ranges that do not
        # overlap), so copying one range to the other copies exactly one array.
        a, b = source.kvstore, target.kvstore
        return (
            a.path.endswith("/")
            and b.path.endswith("/")
            and a.path != b.path
            and a.base is not None
            and b.base is not None
            and a.base.url == b.base.url
        )

    async def _write_units(units, targets, put):
        """Read layers on `workers` threads, a few ahead of the writes (reading a mapped source
        and transposing it is the slow part when nothing is staged), in order."""
        loop = asyncio.get_running_loop()
        pending_reads: collections.deque = collections.deque()
        ahead = 0
        todo = iter(units)

        def unit_bytes(unit):
            e = store.entry(unit[0])
            return e.nbytes // e.shape[0] if unit[1] is not None else e.nbytes

        def fill(pool):
            nonlocal ahead
            while len(pending_reads) < workers and (not pending_reads or ahead < _READ_AHEAD_BYTES):
                unit = next(todo, None)
                if unit is None:
                    return
                pending_reads.append((unit, loop.run_in_executor(pool, store.read, *unit)))
                ahead += unit_bytes(unit)

        with ThreadPoolExecutor(workers, thread_name_prefix="mugv-jax-write") as pool:
            try:
                fill(pool)
                while pending_reads:
                    (key, i), future = pending_reads.popleft()
                    data = await future
                    ahead -= unit_bytes((key, i))
                    fill(pool)
                    for t in targets[key]:
                        if i is None:
                            await put(t, data)
                        else:
                            await put(t[i : i + 1], data[None])
            finally:
                for _, future in pending_reads:
                    future.cancel()

    original = registry.get_type_handler(np.ndarray)
    registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
        np.ndarray, StreamingHandler(deepcopy_host_arrays=False), override=True, ignore_warnings=True
    )
    try:
        yield
    finally:
        registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(np.ndarray, original, override=True, ignore_warnings=True)


def _to_jax(name: str, config: DiTConfig, array: np.ndarray) -> np.ndarray:
    return jax_layout.release_to_jax(name, array, config)[2]


class JaxWriter(Writer):
    format = "jax"

    def __init__(
        self,
        target: str,
        tmp: str,
        config: DiTConfig,
        entries: dict[str, Entry],
        *,
        step: int = DEFAULT_STEP,
        workers: int = 1,
    ):
        super().__init__(target, config, entries)
        self.tmp, self.step, self.workers = tmp, step, max(1, workers)
        shapes = jax_layout.jax_param_shapes(config)
        dtypes: dict[str, np.dtype] = {}
        for name, e in self.entries.items():
            path, _ = jax_path_of(name)
            if dtypes.setdefault(path, e.dtype) != e.dtype:
                raise ValueError(
                    f"{target}: the layers of JAX parameter {path} would have mixed "
                    f"dtypes ({dtypes[path]} and {e.dtype}); pass --dtype"
                )
        # Next to the output (same filesystem, removed with it), not inside: orbax owns that.
        self.staging = RawStore(tmp + ".staging")
        for path, shape in shapes.items():
            if path in dtypes:
                self.staging.create(path, shape, dtypes[path])

    def _write(self, name: str, array: np.ndarray) -> None:
        if file_backed(array):
            # A view of the mapped source: nothing is staged; the layout transform runs when
            # orbax takes the layer.
            path, layer = jax_path_of(name)
            self.staging.keep(path, array, index=layer, transform=partial(_to_jax, name, self.config))
            return
        path, layer, jarr = jax_layout.release_to_jax(name, array, self.config)
        self.staging.write(path, jarr, index=layer)

    def finish(self) -> None:
        import orbax.checkpoint as ocp

        params = unflatten({p: _stand_in(p, self.staging.entry(p)) for p in self.staging._arrays})
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        manager = ocp.CheckpointManager(self.tmp, options=options, item_names=("state", "config"))
        with _streaming_numpy_handler(self.staging, self.workers):
            manager.save(
                self.step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"params": params, "ema": params}),
                    config=ocp.args.JsonSave({"model": self.config.to_dict()}),
                ),
            )
            manager.wait_until_finished()
        manager.close()
        self.staging.close()

    def abort(self) -> None:
        self.staging.close()
