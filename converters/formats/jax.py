"""The JAX writer: an orbax checkpoint of the JAX trainer's layout (mugv/io/orbax.py names it and
reads it), written per tensor.

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
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from mugv.config import DiTConfig
from mugv.io import orbax
from mugv.io.base import Entry, Writer, file_backed
from mugv.io.staging import RawStore
from mugv.layouts import jax as jax_layout

DEFAULT_STEP = 0
# Writes handed to tensorstore but not yet committed, at most (see StreamingHandler). Each holds
# its data about three times over (input, chunk, compressed); on the 1B preset 4 / 128 MiB was
# both the fastest and the smallest of 1..64 writes (docs/benchmarks.md).
_IN_FLIGHT_BYTES = 128 * 2**20
_IN_FLIGHT_WRITES = 4
# Layers read ahead of the writes, at most (beyond one per worker thread).
_READ_AHEAD_BYTES = 256 * 2**20


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
            path, _ = jax_layout.jax_path_of(name)
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
            path, layer = jax_layout.jax_path_of(name)
            self.staging.keep(path, array, index=layer, transform=partial(_to_jax, name, self.config))
            return
        path, layer, jarr = jax_layout.release_to_jax(name, array, self.config)
        self.staging.write(path, jarr, index=layer)

    def finish(self) -> None:
        import orbax.checkpoint as ocp

        params = jax_layout.unflatten({p: _stand_in(p, self.staging.entry(p)) for p in self.staging.keys()})
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        manager = ocp.CheckpointManager(self.tmp, options=options, item_names=orbax.WEIGHTS_ITEMS)
        items = {
            orbax.STATE: ocp.args.StandardSave({orbax.PARAMS: params, orbax.EMA: params}),
            orbax.CONFIG: ocp.args.JsonSave(orbax.config_item(self.config)),
        }
        with _streaming_numpy_handler(self.staging, self.workers):
            manager.save(self.step, args=ocp.args.Composite(**items))
            manager.wait_until_finished()
        manager.close()
        self.staging.close()
        orbax.write_digests(os.path.join(self.tmp, str(self.step)))

    def abort(self) -> None:
        self.staging.close()
