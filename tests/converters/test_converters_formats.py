"""Each written format checked with its own library (not our readers); strict key coverage and
bad-input errors; TP/PP rules; JAX trainer checkpoints; config detection; atomic outputs."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch_st

from converters.convert import convert, inspect, verify
from converters.loaders import release_state
from mugv.config import PRESETS, DiTConfig, get_config
from mugv.io.orbax import config_from_jax_shapes
from mugv.io.spec import open_reader
from mugv.layouts import jax as jax_layout
from mugv.layouts import megatron as mlayout
from mugv.schema import detect_config, release_schema, shape_fields
from mugv.training import ObjectiveConfig, OptimConfig
from tests.helpers import DIT_WEIGHTS, dit_weights

TINY = get_config("tiny")
# Four heads of 36 (a multiple of 6 for the 3D RoPE): the smallest model TP 4 can split.
FOUR_HEADS = DiTConfig(depth=2, hidden_size=144, num_heads=4, text_dim=64, max_text_tokens=16)
REPO = Path(__file__).resolve().parents[2]


def golden_torch(dtype=torch.float32):
    return {k: torch.from_numpy(v).to(dtype) for k, v in dit_weights().items()}


def random_release(config, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in release_schema(config).items()}


def megatron_full(weights, config):
    """{megatron name: full torch tensor} from release weights, via the layout (not our writers)."""
    out = {}
    for name, w in weights.items():
        for mname, arr in mlayout.release_to_megatron(name, torch.as_tensor(w), config):
            out[mname] = arr
    return out


# ---------------------------------------------------------------------------------------------
# Written formats, read back by their own libraries


def test_release_files_load_with_torch_and_safetensors(tmp_path):
    convert(DIT_WEIGHTS, f"release:{tmp_path}/a.safetensors", dtype="bfloat16")
    convert(DIT_WEIGHTS, f"release:{tmp_path}/a.pt")
    want16, want32 = golden_torch(torch.bfloat16), golden_torch()
    got = load_torch_st(tmp_path / "a.safetensors")
    assert list(got) == list(release_schema(TINY))
    for k, v in want16.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), k  # torch's own rounding
    got = torch.load(tmp_path / "a.pt", weights_only=True)
    assert list(got) == list(release_schema(TINY))
    for k, v in want32.items():
        assert torch.equal(got[k], v), k
    mm = torch.load(tmp_path / "a.pt", weights_only=True, mmap=True)
    assert torch.equal(mm["blocks.1.mlp.fc2.weight"], want32["blocks.1.mlp.fc2.weight"])


@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_sharded_release_has_a_valid_index(tmp_path, index):
    convert(DIT_WEIGHTS, f"release:{tmp_path}/shards/{index}", max_shard_bytes=1_000_000)
    meta = json.loads((tmp_path / "shards" / index).read_text())
    shards = sorted(set(meta["weight_map"].values()))
    assert len(shards) > 1 and all("-of-" in s for s in shards)
    loaded = {}
    for s in shards:
        part = (
            load_torch_st(tmp_path / "shards" / s)
            if s.endswith(".safetensors")
            else torch.load(tmp_path / "shards" / s, weights_only=True)
        )
        assert all(meta["weight_map"][k] == s for k in part)
        loaded.update(part)
    assert meta["metadata"]["total_size"] == sum(v.numel() * 4 for v in loaded.values())
    for k, v in golden_torch().items():
        assert torch.equal(loaded[k], v), k


def test_torch_dist_loads_with_dist_checkpointing(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    convert(DIT_WEIGHTS, f"megatron:{tmp_path}/mc")
    assert (tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text() == "1"
    ckpt = tmp_path / "mc" / "iter_0000001"
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    full = megatron_full(dit_weights(), TINY)
    stacked = {}
    for mname, t in full.items():
        layer, sub = (
            mname[len("decoder.layers.") :].split(".", 1) if mname.startswith("decoder.layers.") else (None, mname)
        )
        if layer is None:
            stacked[mname] = t
        else:
            stacked.setdefault("decoder.layers." + sub, [None] * TINY.depth)[int(layer)] = t
    stacked = {k: torch.stack(v) if isinstance(v, list) else v for k, v in stacked.items()}
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    assert {k: tuple(v.global_shape) for k, v in meta.items()} == {k: tuple(v.shape) for k, v in stacked.items()}
    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty_like(v), replica_id=0) for k, v in stacked.items()}
    got = dist_checkpointing.load(request, str(ckpt))
    for k, v in stacked.items():
        assert torch.equal(got[k], v), k
    common = torch.load(ckpt / "common.pt", weights_only=True)
    assert common["mugv"]["model"] == TINY.to_dict() and common["iteration"] == 1
    # Each layer is its own chunk, as Megatron's layer stack saves it.
    md = pickle.load(open(ckpt / ".metadata", "rb"))
    chunks = md.state_dict_metadata["decoder.layers.mlp.linear_fc1.weight"].chunks
    assert sorted(tuple(c.offsets)[0] for c in chunks) == [0, 1] and all(c.sizes[0] == 1 for c in chunks)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_legacy_rank_files_follow_megatron_rules(tmp_path, tp, pp):
    convert(DIT_WEIGHTS, f"megatron-legacy:{tmp_path}/lg", tp=tp, pp=pp)
    full = megatron_full(dit_weights(), TINY)
    per = TINY.depth // pp
    for t in range(tp):
        for p in range(pp):
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            sd = torch.load(tmp_path / "lg" / "iter_0000001" / name / "model_optim_rng.pt", weights_only=True)
            assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 1
            model = sd["model"]
            want = {}
            for mname, v in full.items():
                if mname.startswith("decoder.layers."):
                    layer, sub = mname[len("decoder.layers.") :].split(".", 1)
                    if int(layer) // per != p:
                        continue
                    mname = f"decoder.layers.{int(layer) % per}.{sub}"
                elif mname.startswith(("x_embedder", "start_token", "end_token")) and p != 0:
                    continue
                elif mname.startswith("final_layer") and p != pp - 1:
                    continue
                want[mname] = mlayout.tp_shard(mname, v, t, tp)
            assert set(model) == set(want), (name, set(model) ^ set(want))
            for k, v in want.items():
                assert torch.equal(model[k], v), (name, k)


def test_tp4_on_a_four_head_model(tmp_path):
    weights = random_release(FOUR_HEADS)
    save_numpy(weights, str(tmp_path / "w.safetensors"))
    for pp in (1, 2):
        out = tmp_path / f"tp4_pp{pp}"
        convert(str(tmp_path / "w.safetensors"), f"megatron-legacy:{out}", model=FOUR_HEADS, tp=4, pp=pp)
        assert len(list((out / "iter_0000001").iterdir())) == 4 * pp
        rank3 = torch.load(
            out / "iter_0000001" / ("mp_rank_03" + ("_001" if pp == 2 else "")) / "model_optim_rng.pt",
            weights_only=True,
        )["model"]
        qkv = rank3["decoder.layers.0.self_attention.linear_qkv.weight"]
        # Rank 3 owns head 3 whole: its q, k and v rows.
        d, c = FOUR_HEADS.head_dim, FOUR_HEADS.hidden_size
        layer = 1 if pp == 2 else 0
        release_qkv = weights[f"blocks.{layer}.attn.qkv.weight"]
        want = np.concatenate([release_qkv[n * c + 3 * d : n * c + 4 * d] for n in range(3)])
        assert np.array_equal(qkv.numpy(), want)
        got = release_state(f"megatron:{out}", model=FOUR_HEADS)
        for k, v in weights.items():
            assert np.array_equal(got[k], v), k


def test_tp_and_pp_that_do_not_divide_are_refused(tmp_path):
    with pytest.raises(ValueError, match="TP 4 does not divide 2 attention heads"):
        convert(DIT_WEIGHTS, f"megatron-legacy:{tmp_path}/x", tp=4)
    with pytest.raises(ValueError, match="PP 3 does not divide 2 layers"):
        convert(DIT_WEIGHTS, f"megatron-legacy:{tmp_path}/y", pp=3)
    with pytest.raises(ValueError, match="--tp/--pp apply to Megatron outputs"):
        convert(DIT_WEIGHTS, f"jax:{tmp_path}/z", tp=2)
    assert not any(tmp_path.iterdir())


def test_jax_checkpoint_restores_with_orbax(tmp_path):
    import orbax.checkpoint as ocp

    convert(DIT_WEIGHTS, f"jax:{tmp_path}/jx@5")
    mgr = ocp.CheckpointManager(str(tmp_path / "jx"), item_names=("state", "config"))
    assert mgr.all_steps() == [5]
    got = mgr.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    assert got["config"] == {"model": TINY.to_dict()}
    shapes = jax_layout.jax_param_shapes(TINY)
    want = {p: np.zeros(s, np.float32) for p, s in shapes.items()}
    for name, w in dit_weights().items():
        path, layer, arr = jax_layout.release_to_jax(name, w, TINY)
        if layer is None:
            want[path] = arr
        else:
            want[path][layer] = arr
    for root in ("params", "ema"):
        for path, w in want.items():
            node = got["state"][root]
            for part in path.split("."):
                node = node[part]
            assert np.array_equal(np.asarray(node), w), (root, path)


# ---------------------------------------------------------------------------------------------
# JAX trainer checkpoints


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    """Checkpoints written by the trainer's Checkpointer (steps 1 and 2) with the params and EMA
    sharded as the trainer shards them on a 2x2 (fsdp, tensor) mesh, so every array is stored in
    several chunks, each spanning all layers."""
    import jax

    from mugv_jax.train.checkpointing import Checkpointer
    from tests.trainer_helpers import make_trainer

    trainer = make_trainer((1, 2, 2, 1))
    shardings = jax.tree.map(lambda a: a.sharding, trainer.abstract_state())
    d = tmp_path_factory.mktemp("trainer") / "checkpoints"
    ckpt = Checkpointer(str(d))
    states = {}
    for step, seed in ((1, 0), (2, 1)):
        rng = np.random.default_rng(seed)
        params = jax.tree.map(
            lambda s: rng.standard_normal(s.shape).astype(np.float32), trainer.abstract_state()["params"]
        )
        ema = jax.tree.map(lambda x: x * np.float32(0.5), params)
        state = {
            "params": jax.device_put(params, shardings["params"]),
            "ema": jax.device_put(ema, shardings["ema"]),
            "step": np.int32(step),
        }
        ckpt.save(step, state, {"position": 0}, {"model": TINY.to_dict()})
        ckpt.wait()
        states[step] = {"params": params, "ema": ema}
    ckpt.close()
    return d, states


def _release_of(tree):
    return dict(jax_layout.jax_to_release_all(jax_layout.flatten(tree), TINY))


@pytest.mark.parametrize("step,weights", [(None, "raw"), (1, "raw"), (2, "ema")])
def test_trainer_checkpoint_reads_params_or_ema(trainer_checkpoint, tmp_path, step, weights):
    d, states = trainer_checkpoint
    src = f"jax:{d}" + (f"@{step}" if step else "")
    convert(src, f"release:{tmp_path}/out.safetensors", weights=weights)
    want = _release_of(states[step or 2]["params" if weights == "raw" else "ema"])
    got = release_state(f"{tmp_path}/out.safetensors")
    for k, v in want.items():
        assert np.array_equal(got[k], v), k
    # The workdir (parent of checkpoints/) works as a path too.
    assert verify(
        f"jax:{d.parent}" + (f"@{step}" if step else ""), f"{tmp_path}/out.safetensors", weights=weights
    ).equal


def test_trainer_checkpoint_inspect_and_missing_step(trainer_checkpoint):
    d, _ = trainer_checkpoint
    info = inspect(str(d))
    assert info["format"] == "jax" and info["step"] == 2 and info["steps present"] == [1, 2]
    assert info["tensors"] == 63 and info["state entries"] == ["ema", "params", "step"]
    assert info["config"].startswith("tiny")
    with pytest.raises(FileNotFoundError, match=r"no step 7 \(steps present: \[1, 2\]\)"):
        inspect(f"jax:{d}@7")


def test_jax_params_initialise_the_trainer(tmp_path):
    import jax

    from mugv.io.weights import load_params as jax_params
    from tests.trainer_helpers import make_trainer

    convert(DIT_WEIGHTS, f"jax:{tmp_path}/jx")
    config, params = jax_params(f"jax:{tmp_path}/jx")
    assert config == TINY
    state = make_trainer((1, 2, 2, 1)).init_state(0, params)
    assert _release_of(jax.tree.map(np.asarray, state["params"])).keys() == dit_weights().keys()
    for k, v in _release_of(jax.tree.map(np.asarray, state["params"])).items():
        assert np.array_equal(v, dit_weights()[k]), k


# ---------------------------------------------------------------------------------------------
# Strict coverage and bad inputs


def _write_release(path, weights):
    save_numpy(weights, str(path))
    return str(path)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    w = dict(dit_weights())
    del w["blocks.1.mlp.fc2.bias"]
    w["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    w["blocks.0.attn.proj.weight"] = np.zeros((144, 140), np.float32)
    src = _write_release(tmp_path / "bad.safetensors", w)
    with pytest.raises(ValueError) as e:
        convert(src, f"jax:{tmp_path}/out", model="tiny")
    msg = str(e.value)
    assert src in msg
    assert "missing tensors (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected tensors (1): blocks.0.extra.weight" in msg
    assert "tensor blocks.0.attn.proj.weight: shape [144, 140] in checkpoint, model expects [144, 144]" in msg
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_match_the_shapes_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match="blocks.0.attn.qkv.weight: shape \\[432, 144\\] in checkpoint, model expects \\[864, 288\\]"
    ):
        convert(DIT_WEIGHTS, f"release:{tmp_path}/x.pt", model="debug")


def test_megatron_and_jax_sources_are_checked_strictly(tmp_path):
    convert(DIT_WEIGHTS, f"megatron-legacy:{tmp_path}/lg", tp=2)
    f = tmp_path / "lg" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    sd = torch.load(f, weights_only=True)
    del sd["model"]["decoder.layers.1.mlp.linear_fc1.bias"]
    torch.save(sd, f)
    with pytest.raises(
        ValueError,
        match=r"mp_rank_01/model_optim_rng.pt: tensor "
        r"decoder.layers.1.mlp.linear_fc1.bias is missing on TP rank 1",
    ):
        release_state(f"megatron:{tmp_path}/lg")
    sd = torch.load(tmp_path / "lg" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    sd["model"]["decoder.layers.0.bogus.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "lg" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(ValueError, match="unexpected tensors \\(1\\): decoder.layers.0.bogus.weight"):
        convert(f"megatron:{tmp_path}/lg", f"release:{tmp_path}/x.pt")
    it = tmp_path / "lg" / "iter_0000001"
    os.rename(it / "mp_rank_01", it / "gone")
    os.rename(it / "mp_rank_00", it / "mp_rank_01")
    with pytest.raises(
        ValueError,
        match=r"incomplete legacy checkpoint, no directory for "
        r"\(TP rank, PP rank\) \[\(0, 0\)\]",
    ):
        release_state(f"megatron:{tmp_path}/lg")


def test_unsafe_or_broken_files_are_refused_with_the_file_named(tmp_path):
    import collections

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        inspect(str(tmp_path / "junk.safetensors"))
    # A reference to os.system: refused by the weights-only unpickler before anything runs.
    torch.save({"x": os.system}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt as a torch checkpoint with weights_only=True"):
        inspect(str(tmp_path / "evil.pt"))
    torch.save({"a": torch.zeros(2), "n": 3}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="nested.pt: entry 'n' is a int, not a tensor"):
        inspect(str(tmp_path / "nested.pt"))
    convert(DIT_WEIGHTS, f"megatron:{tmp_path}/mc")
    meta = tmp_path / "mc" / "iter_0000001" / ".metadata"
    meta.write_bytes(pickle.dumps(collections.Counter(a=1)))
    # As another tool's checkpoint would come: no digest table (ours reports the change first).
    os.remove(tmp_path / "mc" / "iter_0000001" / "mugv_digests.json")
    with pytest.raises(
        ValueError,
        match=r"\.metadata: refusing to read torch_dist metadata "
        r"\(global collections.Counter",
    ):
        inspect(str(tmp_path / "mc"))


def test_ema_needs_a_training_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="--weights ema needs a JAX or Megatron torch_dist training checkpoint"):
        convert(DIT_WEIGHTS, f"jax:{tmp_path}/x", weights="ema")


# ---------------------------------------------------------------------------------------------
# Config detection


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_detected_from_shapes(name):
    config = PRESETS[name]
    assert detect_config(release_schema(config)) == config
    assert config_from_jax_shapes(jax_layout.jax_param_shapes(config), "x") == config


def test_a_custom_config_is_detected_field_by_field():
    config = DiTConfig(
        depth=3,
        hidden_size=216,
        num_heads=3,
        text_dim=32,
        patch_size=(1, 2, 2),
        in_channels=8,
        out_channels=16,
        mlp_ratio=2.0,
        frequency_dim=128,
    )
    got = detect_config(release_schema(config))
    assert shape_fields(got) == shape_fields(config)
    schema = release_schema(config)
    del schema["blocks.0.attn.q_norm.weight"]
    with pytest.raises(ValueError, match="the checkpoint has no blocks.0.attn.q_norm.weight"):
        detect_config(schema)


def test_config_is_detected_without_a_stored_one(tmp_path):
    # The torch .pt release holds only tensors: the preset comes from the shapes.
    convert(DIT_WEIGHTS, f"release:{tmp_path}/a.pt")
    info = inspect(str(tmp_path / "a.pt"))
    assert info["config"].startswith("tiny (")
    assert info["config"].endswith("[detected from the tensor shapes]")
    assert info["tensors"] == 63 and info["dtypes"] == {"float32": 63} and info["size"] == 983856 * 4


# ---------------------------------------------------------------------------------------------
# Outputs: never clobbered, never half-written


def test_existing_output_needs_force(tmp_path):
    dst = tmp_path / "x.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=f"output {dst} already exists; pass --force"):
        convert(DIT_WEIGHTS, f"release:{dst}")
    assert dst.read_bytes() == b"keep me"
    convert(DIT_WEIGHTS, f"release:{dst}", force=True)
    assert verify(DIT_WEIGHTS, str(dst)).equal
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]


@pytest.mark.parametrize("fmt", ["release:{d}/o.pt", "megatron:{d}/o", "megatron-legacy:{d}/o", "jax:{d}/o"])
def test_a_failing_conversion_leaves_nothing(tmp_path, monkeypatch, fmt):
    from mugv.io.release import ReleaseReader

    jobs = ReleaseReader.jobs  # what a conversion reads through (each tensor checked on a worker)

    def failing(self):
        for i, item in enumerate(jobs(self)):
            if i == 30:
                raise RuntimeError("disk on fire")
            yield item

    monkeypatch.setattr(ReleaseReader, "jobs", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(DIT_WEIGHTS, fmt.format(d=tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_killed_conversion_leaves_nothing_that_looks_complete(tmp_path):
    # The reader is slowed down so the process is killed mid-write.
    code = (
        "import time, sys\n"
        "from mugv.io.release import ReleaseReader\n"
        "jobs = ReleaseReader.jobs\n"
        "def slow(self):\n"
        "    for i, item in enumerate(jobs(self)):\n"
        "        time.sleep(0.5 if i > 5 else 0)\n"
        "        yield item\n"
        "ReleaseReader.jobs = slow\n"
        "from converters.cli import main\n"
        f"sys.exit(main(['convert', '--src', {DIT_WEIGHTS!r}, '--dst', 'release:{tmp_path}/out.pt',"
        " '--quiet']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.time() + 60
    while not any(".partial" in n for n in os.listdir(tmp_path)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = os.listdir(tmp_path)
    assert "out.pt" not in names
    assert names and all(n.startswith(".out.pt.partial-") for n in names)


# ---------------------------------------------------------------------------------------------
# The Megatron trainer's EMA (optimizer.state.exp_moving_avg.<name>)


def test_megatron_training_checkpoint_reads_params_or_ema(tmp_path):
    """weights="ema" reads the EMA the Megatron trainer stores next to its weights (stacked
    layers included), weights="raw" the weights; a checkpoint without an EMA is refused."""
    from mugv.io.torch_dist import TorchDistReader
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train import checkpointing
    from mugv_megatron.train.step import Trainer

    parallel.setup(1)
    tr = Trainer(TINY, OptimConfig(), ObjectiveConfig(), seed=3, use_megatron_optimizer=False)
    with torch.no_grad():
        for i, t in enumerate(tr.ema.shadow.values()):
            # Distinct from the weights everywhere, so reading the wrong set cannot pass.
            t.mul_(0.5).add_(1.0 + i)
    ckdir = str(tmp_path / "checkpoints")
    checkpointing.save(ckdir, tr, {"position": 0})
    for weights, tensors in (("raw", dict(tr.module.named_parameters())), ("ema", tr.ema.shadow)):
        want = mlayout.megatron_state_to_release({n: t.detach().numpy() for n, t in tensors.items()}, TINY)
        reader = TorchDistReader(ckdir, weights=weights)
        got = dict(reader.items())
        assert set(got) == set(want), set(got) ^ set(want)
        for name, value in want.items():
            assert np.array_equal(got[name], np.asarray(value)), (weights, name)
        assert reader.describe()["weights"] == weights
    assert "decoder.layers.mlp.linear_fc1.weight" in TorchDistReader(ckdir, weights="ema").skipped
    # The same through convert/verify (what `python -m converters convert --weights ema` runs).
    convert(f"megatron:{ckdir}", f"release:{tmp_path}/ema.safetensors", weights="ema")
    ema_release = dict(open_reader(f"release:{tmp_path}/ema.safetensors").items())
    want = mlayout.megatron_state_to_release({n: t.detach().numpy() for n, t in tr.ema.shadow.items()}, TINY)
    assert all(np.array_equal(ema_release[n], np.asarray(v)) for n, v in want.items())
    assert verify(f"megatron:{ckdir}", f"{tmp_path}/ema.safetensors", weights="ema").equal
    convert(DIT_WEIGHTS, f"megatron:{tmp_path}/plain")
    with pytest.raises(
        ValueError,
        match=r"plain/iter_0000001: --weights ema needs a Megatron "
        r"training checkpoint with an EMA",
    ):
        TorchDistReader(str(tmp_path / "plain"), weights="ema")
