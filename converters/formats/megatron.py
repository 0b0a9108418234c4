"""Megatron-Core checkpoints: the torch_dist writer, and the legacy per-rank files read and
written.

Both sit in a save directory (mugv/io/megatron.py names it: tracker, `iter_XXXXXXX/`,
docs/reference.md §4.6); names and per-head regrouping come from mugv/layouts/megatron.py.

torch_dist (`iter_XXXXXXX/{.metadata, __0_0.distcp, common.pt, metadata.json}`): read by the
core's `mugv.io.torch_dist.TorchDistReader` (both trainers' `init_from` use it too), written
here with `megatron.core.dist_checkpointing` in one process, under the key scheme of
`mugv.io.torch_dist.stored_key`: each layer saved as its own chunk of its stack, all full
(un-split) tensors; TP/PP do not change it. Writing stages the tensors on disk first because DCP
saves a whole state dict in one call; the staged files are memory-mapped into that call, so the
data goes file → page cache → file.

Legacy (`iter_XXXXXXX/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`, each `{"model": {…}}`):
column-parallel tensors cut along dim 0, row-parallel along dim 1 (after the per-head regroup),
layers split evenly over PP stages with stage-local indices; x_embedder and the start/end tokens
on the first stage, final_layer on the last, the t/fps/caption embedders on every stage
(docs/reference.md §4.2). Written with `torchzip` (no whole state dict in memory), read with
`torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from mugv.config import DiTConfig
from mugv.io import megatron as save_dir
from mugv.io import torch_cpu, torchzip
from mugv.io.base import Entry, Writer, cast, file_backed, to_torch, torch_dtype_of
from mugv.io.staging import RawStore
from mugv.io.torch_dist import (
    EMA_PREFIX,
    NULL_TEXT_KEY,
    extra_state_objects,
    is_skipped,
    official_ema_fragments,
    stored_key,
    to_official_ema,
    write_digests,
)
from mugv.layouts import megatron as layout

DEFAULT_ITERATION = 1


def check_parallel(config: DiTConfig, tp: int, pp: int) -> None:
    """TP must give every rank whole heads and an even MLP split; PP an even layer split."""
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"TP and PP must be >= 1 (got TP {tp}, PP {pp})")
    else:
        if config.num_heads % tp:
            problems.append(f"TP {tp} does not divide {config.num_heads} attention heads")
        if config.mlp_hidden_size % tp:
            problems.append(f"TP {tp} does not divide the MLP width {config.mlp_hidden_size}")
        if config.depth % pp:
            problems.append(f"PP {pp} does not divide {config.depth} layers evenly")
    if problems:
        raise ValueError("cannot lay out the model for Megatron: " + "; ".join(problems))


def _as_weights(null_text: np.ndarray, entries: dict[str, Entry]) -> np.ndarray:
    """The null caption in the weights' dtype, as the official model keeps its `drop_emb` buffer
    (bf16 in a bf16 run; hf2mcore's float32 files hold it in float32)."""
    return np.ascontiguousarray(cast(np.asarray(null_text), entries["x_embedder.proj.weight"].dtype))


def _stage_of(release_name: str, config: DiTConfig, pp: int) -> list[tuple[int, str]]:
    """(PP stage, stage-local Megatron name) of every copy of a release tensor."""
    mname = layout.megatron_name(release_name)
    layer, suffix = layout.split_layer(mname)
    if layer is not None:
        per = config.depth // pp
        return [(layer // per, layout.layer_name(layer % per, suffix))]
    if mname.startswith(("x_embedder.", "start_token", "end_token")):
        return [(0, mname)]
    if mname.startswith("final_layer."):
        return [(pp - 1, mname)]
    return [(s, mname) for s in range(pp)]


class TorchDistWriter(Writer):
    format = "megatron"

    def __init__(
        self,
        target: str,
        tmp: str,
        config: DiTConfig,
        entries: dict[str, Entry],
        *,
        tp: int = 1,
        pp: int = 1,
        iteration: int = DEFAULT_ITERATION,
        write_processes: int = 1,
        null_text: np.ndarray | None = None,
        ema=None,
        common: dict | None = None,
    ):
        """`common`: entries added to common.pt's `mugv` beside the model config.
        `ema`: (reader of the source's EMA, its output dtype or None, layout "mugv" or
        "official"): the EMA is written next to the weights, `optimizer.state.exp_moving_avg.<key>`
        in our layout (the weight's own shape) or the official trainer's for TP `tp`."""
        super().__init__(target, config, entries)
        check_parallel(config, tp, pp)
        self.tmp, self.iteration, self.tp = tmp, iteration, tp
        self.null_text = None if null_text is None else _as_weights(null_text, self.entries)
        self.ema = ema
        self.common = dict(common or {})
        self.write_processes = max(1, write_processes)
        os.makedirs(tmp)
        self.iter_dir = save_dir.iter_dir(tmp, iteration)
        os.makedirs(self.iter_dir)
        self.staging = RawStore(os.path.join(tmp, ".staging"))
        torch_cpu.one_process_group("writing torch_dist with the converters")

    def _write(self, name: str, array: np.ndarray) -> None:
        for mname, marr in layout.release_to_megatron(name, array, self.config):
            if file_backed(marr) and marr.flags.c_contiguous:
                # Same bytes as the mapped source (no regroup, no cast): DCP writes from there.
                self.staging.keep(mname, marr)
            else:
                self.staging.create(mname, marr.shape, marr.dtype)
                self.staging.write(mname, np.ascontiguousarray(marr))

    def _stage_ema(self) -> None:
        """The source's EMA, one tensor at a time, staged under its DCP key's name: in the
        official layout each layer already as `to_official_ema` lays it out."""
        reader, dtype, ema_layout = self.ema
        for name, array in reader.items():
            for mname, marr in layout.release_to_megatron(name, cast(array, dtype), self.config):
                layer, _ = layout.split_layer(mname)
                if ema_layout == "official":
                    per_layer = marr.shape
                    frags = official_ema_fragments(mname, per_layer, self.tp)
                    marr = (
                        to_official_ema(marr[None], frags, True)[0]
                        if layer is not None
                        else to_official_ema(marr, frags, False)
                    )
                self.staging.create(EMA_PREFIX + mname, marr.shape, marr.dtype)
                self.staging.write(EMA_PREFIX + mname, np.ascontiguousarray(marr))

    def finish(self) -> None:
        import torch
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        if self.ema is not None:
            self._stage_ema()
        depth = self.config.depth
        sd: dict = {}
        for mname in self.staging.keys():
            entry = self.staging.entry(mname)
            # The storage of each tensor is exactly the tensor (its own staging file, or
            # from_numpy of a view), so dist_checkpointing writes it without a copy.
            if self.staging.file(mname) is None:
                t = to_torch(self.staging.read(mname))
            else:
                t = torch.from_file(
                    self.staging.file(mname),
                    shared=False,
                    size=int(np.prod(entry.shape, dtype=np.int64)),
                    dtype=torch_dtype_of(entry.dtype),
                ).view(entry.shape)
            if mname.startswith(EMA_PREFIX):
                key, layer = stored_key(mname[len(EMA_PREFIX) :], EMA_PREFIX)
            else:
                key, layer = stored_key(mname)
            if layer is None:
                sd[mname] = ShardedTensor.from_rank_offsets(key, t, replica_id=0)
            else:
                sd[mname] = ShardedTensor.from_rank_offsets(
                    key, t.view(1, *entry.shape), (0, layer, depth), replica_id=0
                )
        if self.null_text is not None:
            null = to_torch(self.null_text)
            sd["null_text"] = ShardedTensor.from_rank_offsets(NULL_TEXT_KEY, null, replica_id=0)
        # What Megatron-LM's load asks for beside the weights (docs/converters.md, "Megatron-LM").
        sd.update(extra_state_objects(depth, range(depth), final_layer=True))
        sd.update(save_dir.common_state(self.config, self.iteration))
        sd["mugv"].update(self.common)
        # Each tensor goes into the .distcp files as a torch.save archive; their CRC32s cost a
        # pass over every byte and torch.load does not check them.
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # thread_count: the writer forks that many processes, each writing one file.
                dist_checkpointing.save(
                    sd,
                    self.iter_dir,
                    sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=self.write_processes),
                )
        finally:
            torch.serialization.set_crc32_options(crc)
        del sd
        self.staging.close()
        # Every byte checksummed, each tensor's archive on its own (mugv.io.torch_dist).
        write_digests(self.iter_dir)
        save_dir.write_tracker(self.tmp, self.iteration)

    def abort(self) -> None:
        self.staging.close()


# ---------------------------------------------------------------------------------------------
# Legacy per-rank files


def _concat(arrays, axis):
    return np.concatenate(arrays, axis=axis)


class LegacyReader(save_dir.MegatronReader):
    format = "megatron"

    def __init__(self, path: str, iteration: int | None = None):
        self.path = path
        self.dir, self.iteration = save_dir.resolve_iteration_dir(path, iteration, save_dir.is_legacy_dir)
        ranks = save_dir.rank_dirs(self.dir)
        self.tp = 1 + max(t for t, _ in ranks)
        self.pp = 1 + max(p for _, p in ranks)
        missing = [(t, p) for t in range(self.tp) for p in range(self.pp) if (t, p) not in ranks]
        if missing:
            raise ValueError(
                f"{self.dir}: incomplete legacy checkpoint, no directory for "
                f"(TP rank, PP rank) {missing} of a TP {self.tp} x PP {self.pp} grid"
            )
        self._models: dict[tuple[int, int], dict] = {}
        self._files: dict[tuple[int, int], save_dir.MegatronFile] = {}
        self.files = {}
        self.stored_config = None
        for (t, p), d in sorted(ranks.items()):
            f = os.path.join(d, save_dir.LEGACY_FILE)
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{d}: no {save_dir.LEGACY_FILE}")
            rank_file = save_dir.MegatronFile(f)
            state = rank_file.obj
            if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
                keys = list(state)[:8] if isinstance(state, dict) else rank_file.describe(state)
                raise ValueError(
                    f"{f}: expected a dict with a 'model' state dict (keys: {keys}); "
                    f"virtual-pipeline checkpoints (model0, model1, …) are not supported"
                )
            self._models[(t, p)] = state["model"]
            self._files[(t, p)] = rank_file
            self.files[(t, p)] = f
            if self.stored_config is None:
                self.stored_config = save_dir.stored_config(state)
        # Stage-local layer indices → global: stages hold consecutive layers.
        offsets, total = [], 0
        for p in range(self.pp):
            offsets.append(total)
            layers = {layout.split_layer(k)[0] for k in self._models[(0, p)]} - {None}
            total += (max(layers) + 1) if layers else 0
        self.depth = total
        # release name → (PP stage, stage-local Megatron name, global Megatron name)
        self._src: dict[str, tuple[int, str, str]] = {}
        self._entries: dict[str, Entry] = {}
        self.skipped = []
        for p in range(self.pp):
            rank_file = self._files[(0, p)]
            for local, value in self._models[(0, p)].items():
                if is_skipped(local):
                    self.skipped.append(local)
                    continue
                if not rank_file.is_tensor(value):
                    raise ValueError(
                        f"{self.files[(0, p)]}: model entry {local!r} is {rank_file.describe(value)}, not a tensor"
                    )
                layer, suffix = layout.split_layer(local)
                gname = local if layer is None else layout.layer_name(layer + offsets[p], suffix)
                try:
                    name = layout.release_name(gname)
                except KeyError:
                    name = gname
                if name in self._src:
                    continue  # an embedder replicated on every stage: the first copy is used
                entry = rank_file.entry(value)
                shape = list(entry.shape)
                rule = layout.tp_split_rule(gname)
                if rule != "replicated":
                    shape[0 if rule == "column" else 1] *= self.tp
                self._src[name] = (p, local, gname)
                self._entries[name] = Entry(shape, entry.dtype)

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def get(self, name: str) -> np.ndarray:
        if name not in self._src:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        p, local, gname = self._src[name]
        shards = []
        for t in range(self.tp):
            value = self._models[(t, p)].get(local)
            if value is None:
                raise ValueError(f"{self.files[(t, p)]}: tensor {local} is missing on TP rank {t} (present on rank 0)")
            rank_file = self._files[(t, p)]
            if not rank_file.is_tensor(value):
                raise ValueError(
                    f"{self.files[(t, p)]}: model entry {local!r} is {rank_file.describe(value)}, not a tensor"
                )
            shards.append(rank_file.array(value, local))
        full = layout.tp_merge(gname, shards, _concat)
        want = self._entries[name].shape
        if tuple(full.shape) != want:
            raise ValueError(
                f"{self.dir}: tensor {gname} merges to {list(full.shape)} over TP {self.tp}, expected {list(want)}"
            )
        ((_, array),) = layout.megatron_to_release(gname, full, self._config_for_layout())
        return np.ascontiguousarray(array)

    def null_text(self) -> tuple[np.ndarray, str] | None:
        """hf2mcore's `context_embedder.drop_emb` (the official trainer's null caption, always
        written), or ours; None when the files hold none."""
        value = self._models[(0, 0)].get(NULL_TEXT_KEY)
        rank_file = self._files[(0, 0)]
        if value is None or not rank_file.is_tensor(value):
            return None
        array = rank_file.array(value, NULL_TEXT_KEY)
        return np.array(array, np.float32), f"megatron-legacy:{self.files[(0, 0)]} {NULL_TEXT_KEY}"

    def integrity(self):
        """Each rank file's tensors against the CRCs our legacy writer records."""
        from mugv.io.digest import Check, CorruptCheckpoint

        problems, checked, recorded = [], 0, False
        for f in self.files.values():
            try:
                z = torchzip.TorchZipFile(f, unread_globals=True)
            except torchzip.NeedsTorch:
                continue
            if not z.digests:
                continue
            recorded = True
            model = z.obj.get("model", {}) if isinstance(z.obj, dict) else {}
            for name, ref in model.items():
                if isinstance(ref, torchzip.TensorRef):
                    try:
                        checked += z.array(ref, name).nbytes
                    except CorruptCheckpoint as e:
                        problems += e.problems
        return Check(problems, checked) if recorded else None

    def describe(self) -> dict:
        return {
            "variant": "legacy",
            "directory": self.dir,
            "iteration": self.iteration,
            "tp": self.tp,
            "pp": self.pp,
            "layers": self.depth,
            "skipped entries": len(self.skipped),
        }


class LegacyWriter(Writer):
    format = "megatron-legacy"

    def __init__(
        self,
        target: str,
        tmp: str,
        config: DiTConfig,
        entries: dict[str, Entry],
        *,
        tp: int = 1,
        pp: int = 1,
        iteration: int = DEFAULT_ITERATION,
        null_text: np.ndarray | None = None,
    ):
        super().__init__(target, config, entries)
        check_parallel(config, tp, pp)
        self.tp, self.pp, self.tmp, self.iteration = tp, pp, tmp, iteration
        null = None if null_text is None else _as_weights(null_text, self.entries)
        it_dir = save_dir.iter_dir(tmp, iteration)
        # (TP rank, PP stage) → {stage-local Megatron name: slot}
        slots: dict[tuple[int, int], dict] = {(t, p): {} for t in range(tp) for p in range(pp)}
        self._route: dict[str, list[tuple[int, str]]] = {}
        for name, e in self.entries.items():
            mname = layout.megatron_name(name)
            # A zero-strided stand-in gives each rank's shard shape without allocating.
            stand_in = np.lib.stride_tricks.as_strided(np.zeros((), e.dtype), e.shape, (0,) * len(e.shape))
            self._route[name] = _stage_of(name, config, pp)
            for p, local in self._route[name]:
                for t in range(tp):
                    shard = layout.tp_shard(mname, stand_in, t, tp)
                    key = str(len(slots[(t, p)]))
                    slots[(t, p)][local] = torchzip.TensorSlot(key, Entry(shard.shape, e.dtype))
        if null is not None:
            # The null caption sits in the caption embedder, which every stage holds (hf2mcore's place).
            for rank_slots in slots.values():
                rank_slots[NULL_TEXT_KEY] = torchzip.TensorSlot(str(len(rank_slots)), Entry(null.shape, null.dtype))
        args = save_dir.megatron_lm_args(config, iteration, save_dir.Layout(tp=tp, pp=pp), ckpt_format="torch")
        self._files: dict[tuple[int, int], torchzip.StreamingTorchFile] = {}
        for (t, p), rank_slots in slots.items():
            d = os.path.join(it_dir, save_dir.rank_dir_name(t, p, pp))
            os.makedirs(d)
            obj = {"model": rank_slots, **save_dir.common_state(config, iteration, args)}
            self._files[(t, p)] = torchzip.StreamingTorchFile(
                os.path.join(d, save_dir.LEGACY_FILE), obj, list(rank_slots.values())
            )
            if null is not None:
                self._files[(t, p)].write(rank_slots[NULL_TEXT_KEY].key, null)
        self._slots = slots

    def _write(self, name: str, array: np.ndarray) -> None:
        ((mname, marr),) = layout.release_to_megatron(name, array, self.config)
        for p, local in self._route[name]:
            for t in range(self.tp):
                shard = np.ascontiguousarray(layout.tp_shard(mname, marr, t, self.tp))
                self._files[(t, p)].write(self._slots[(t, p)][local].key, shard)

    def finish(self) -> None:
        for f in self._files.values():
            f.close()
        save_dir.write_tracker(self.tmp, self.iteration)

    def abort(self) -> None:
        for f in self._files.values():
            f.abort()
