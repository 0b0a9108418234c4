"""Context parallelism equals the one-process model: outputs, loss and every parameter gradient.

One spawn of four gloo processes runs every layout of this file and of tests/mugv_megatron/test_megatron_pp.py
in turn (megatron's parallel state is rebuilt between layouts, the process group is kept; process
start-up dominates the cost on two CPU cores). The context-parallel layouts:
* CP = 2 × DP = 2: each data-parallel replica gets its own micro-batch; the loss scaling and
  megatron's DDP must sum the grads over the two CP ranks and average them over the replicas;
* CP = 2 × TP = 2 with sequence parallelism, two micro-batches of different lengths.
The clips are non-square and multi-frame (latent 3×6×10 → 45 patches, 47 tokens with
start/end, padded to 48; and 2×4×6 → 12 patches, 14 tokens, padded to 16 under CP × SP), with
padded text, a conditioning frame and uneven frame indices. Every rank loads its part of a
release-layout checkpoint (pipeline.load_release_state).

The helpers and the spawn are shared with tests/mugv_megatron/test_megatron_pp.py.
"""

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mugv.config import DiTConfig
from mugv.io.torch_cpu import free_port
from mugv.layouts import megatron as layout
from mugv_megatron.model import build as dit
from mugv_megatron.parallel import pipeline_parallel as pipeline
from mugv_megatron.parallel import state as parallel
from tests.mugv_megatron.helpers import layer_saved_bytes

# Smaller than "tiny" but with every structural feature: 4 layers (2 per pipeline stage),
# 2 heads (1 per TP rank), head dim 48 (8 RoPE pairs per axis).
SMALL = DiTConfig(depth=4, hidden_size=96, num_heads=2, text_dim=32, max_text_tokens=8)
WORLD = 4
# float32, only the order of sums differs: bounds relative to the largest magnitude of the tensor
# compared (measured: outputs ~2e-7, grads ~3e-6 of the tensor max; see docs/megatron.md).
OUT_REL_ERR = 1e-5
GRAD_REL_ERR = 1e-5
# The loss is a signed mean, mean(out · w) with random w: its terms (|out · w| ≈ 1.08 on average)
# cancel down to 1.4e-2 and -3.0e-4, so its float32 round-off is a fraction of the terms, not of
# the result. Its bound is relative to mean |out · w| (the "loss scale"). A bound relative to
# |loss| asked 3e-9 of a -3e-4 loss, less than another CPU kernel path already moves the
# one-process loss; it failed once (|Δ| 1.5e-8, 1.4e-8 of the scale;
# test_the_loss_bound_is_on_the_scale_of_the_terms has the numbers).
LOSS_REL_ERR = 1e-5
# Latent T×H×W of the two micro-batches (patch 1×2×2).
LATENTS = ((3, 6, 10), (2, 4, 6))
PARAM_STD = 0.1


def make_micro_batches():
    gen = torch.Generator().manual_seed(11)
    batches = []
    for t, h, w in LATENTS:
        b, length = 2, SMALL.max_text_tokens
        frame_indice = torch.stack([torch.arange(t + 2), torch.arange(t + 2) * 2 + 1])
        batches.append(
            {
                "x": torch.randn(b, SMALL.in_channels, t, h, w, generator=gen),
                "timestep": torch.tensor([417.0, 92.5]),
                "y": torch.randn(b, 1, length, SMALL.text_dim, generator=gen),
                "mask": (torch.arange(length) < torch.tensor([[5], [length]])).to(torch.int64),
                # Sample 1 conditions on its first frame (modulated with t = 0).
                "x_mask": torch.stack([torch.ones(t, dtype=torch.bool), torch.arange(t) > 0]),
                "fps": torch.tensor([24.0, 30.0]),
                "frame_indice": frame_indice,
                "loss_weights": torch.randn(b, SMALL.out_channels, t, h, w, generator=gen),
            }
        )
    return batches


def loss_fn(out, batch):
    return (out * batch["loss_weights"]).mean()


def model_inputs(batch):
    kwargs = {k: batch[k] for k in ("mask", "x_mask", "fps", "frame_indice")}
    return (batch["x"], batch["timestep"], batch["y"]), kwargs


def random_release_state(path: Path):
    """Release-layout weights with every parameter O(0.1) (megatron's init makes the attention
    outputs tiny), saved to `path`; returns the one-process model holding them."""
    model = dit.build_model(SMALL, perform_initialization=False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * PARAM_STD
            p.copy_(noise + 1 if name.endswith("layernorm.weight") else noise)
    state = layout.megatron_state_to_release(
        {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, SMALL
    )
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    tmp.rename(path)
    return model


def single_process_reference(model, batches):
    """Outputs of each micro-batch, each micro-batch's loss, and the grads of their mean."""
    model.zero_grad(set_to_none=True)
    outputs, losses = [], []
    for batch in batches:
        args, kwargs = model_inputs(batch)
        out = model(*args, **kwargs)
        outputs.append(out.detach().clone())
        losses.append(loss_fn(out, batch))
    torch.stack(losses).mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    scales = [loss_scale(out, batch) for out, batch in zip(outputs, batches)]
    return {"outputs": outputs, "losses": [v.detach() for v in losses], "loss_scales": scales, "grads": grads}


def loss_scale(out, batch) -> float:
    """mean |out · w|: the magnitude of the terms loss_fn sums, the scale of its round-off."""
    return (out * batch["loss_weights"]).abs().mean().item()


def run_layout(name, sizes, rank, port, weights, batches, results):
    """Build this rank's part of a layout, check its forward, run forward+backward through
    megatron's schedule and DDP, and record loss and reduced grads (global layer names)."""
    from megatron.core import parallel_state as ps

    tp, cp, pp, sp = sizes["tp"], sizes["cp"], sizes["pp"], sizes.get("sp", False)
    parallel.setup(
        tp,
        rank=rank,
        world_size=WORLD,
        master_port=port,
        context_parallel_size=cp,
        pipeline_parallel_size=pp,
        timeout=datetime.timedelta(seconds=120),
    )
    model = dit.build_model(SMALL, sequence_parallel=sp, perform_initialization=False)
    pipeline.load_release_state(model, weights, source="test weights")
    local_tokens = []
    model.decoder.layers[0].register_forward_pre_hook(lambda module, args: local_tokens.append(args[0].shape[0]))
    # Without data parallelism every rank runs all micro-batches; with it, replica d runs the d-th.
    dp = ps.get_data_parallel_world_size()
    indices = list(range(len(batches))) if dp == 1 else [ps.get_data_parallel_rank()]
    mine = [batches[i] for i in indices]
    results[f"{name}.batches"] = torch.tensor(indices)
    results[f"{name}.numel"] = torch.tensor(sum(p.numel() for p in model.parameters()))
    if pp == 1:
        with torch.no_grad():
            results[f"{name}.out"] = model(*model_inputs(batches[0])[0], **model_inputs(batches[0])[1])
        results[f"{name}.local_tokens"] = torch.tensor(local_tokens[-1])
        # What autograd keeps in a layer on this rank, for mugv_megatron/memory.py.
        args, kwargs = model_inputs(batches[0])
        results[f"{name}.saved_layer_bytes"] = torch.tensor(layer_saved_bytes(model, 1, lambda: model(*args, **kwargs)))
    ddp = pipeline.wrap_ddp(model)
    results[f"{name}.eval_loss"] = pipeline.forward_backward(ddp, mine, loss_fn, forward_only=True)
    results[f"{name}.loss"] = pipeline.forward_backward(ddp, mine, loss_fn)
    results[f"{name}.pp_rank"] = torch.tensor(ps.get_pipeline_model_parallel_rank())
    results[f"{name}.tp_group"] = torch.tensor(dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()))
    offset = model.decoder.layer_offset
    for pname, grad in pipeline.gradients(ddp).items():
        if pname.startswith("decoder.layers."):
            index, rest = pname[len("decoder.layers.") :].split(".", 1)
            pname = f"decoder.layers.{int(index) + offset}.{rest}"
        results[f"{name}.grad.{pname}"] = grad.detach().clone()
    ps.destroy_model_parallel()


def worker(rank, port, out_dir, layouts):
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    weights = load_file(out_dir / "weights.safetensors")
    batches = torch.load(out_dir / "batches.pt", weights_only=True)
    results = {}
    for name, sizes in layouts.items():
        run_layout(name, sizes, rank, port, weights, batches, results)
    torch.save(results, out_dir / f"rank{rank}.pt")
    parallel.teardown()


def spawn_layouts(out_dir: Path, layouts: dict):
    """Weights and micro-batches to disk, one 4-process spawn over all layouts, per-rank results."""
    model = random_release_state(out_dir / "weights.safetensors")
    batches = make_micro_batches()
    torch.save(batches, out_dir / "batches.pt")
    mp.spawn(worker, args=(free_port(), str(out_dir), layouts), nprocs=WORLD, join=True)
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return ranks, single_process_reference(model, batches), batches


CP_LAYOUTS = {
    "cp2_dp2": {"tp": 1, "cp": 2, "pp": 1},
    "cp2_tp2_sp": {"tp": 2, "cp": 2, "pp": 1, "sp": True},
}
PP_LAYOUTS = {
    "pp2_dp2": {"tp": 1, "cp": 1, "pp": 2},
    "pp2_tp2_sp": {"tp": 2, "cp": 1, "pp": 2, "sp": True},
    "pp2_cp2": {"tp": 1, "cp": 2, "pp": 2},
}
_RUN = {}


def all_layouts(tmp_path_factory):
    """The one spawn over CP_LAYOUTS and PP_LAYOUTS, run by whichever test module needs it first."""
    if "run" not in _RUN:
        _RUN["run"] = spawn_layouts(tmp_path_factory.mktemp("megatron_cp_pp"), {**CP_LAYOUTS, **PP_LAYOUTS})
    return _RUN["run"]


def rel_err(got, want):
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def expected_loss(reference, ranks, name, rank):
    """The mean loss of the micro-batches this rank ran."""
    return torch.stack([reference["losses"][i] for i in ranks[rank][f"{name}.batches"]]).mean()


def check_gradients(ranks, reference, name):
    """Every rank holding a parameter has, after megatron's reductions, its full gradient (TP
    shards merged over the rank's TP group); returns the largest relative error."""
    prefix = f"{name}.grad."
    worst = 0.0
    held = set()
    for rank, res in enumerate(ranks):
        group = res[f"{name}.tp_group"].tolist()
        for key in res:
            if not key.startswith(prefix):
                continue
            pname = key[len(prefix) :]
            held.add(pname)
            shards = [ranks[g][key] for g in group]
            got = layout.tp_merge(pname, shards, lambda arrays, dim: torch.cat(arrays, dim))
            err = rel_err(got, reference["grads"][pname])
            assert err <= GRAD_REL_ERR, (name, rank, pname, err)
            worst = max(worst, err)
    assert held == set(reference["grads"]), set(reference["grads"]) ^ held
    return worst


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    return all_layouts(tmp_path_factory)


@pytest.mark.parametrize("name", CP_LAYOUTS)
def test_output_matches_single_process(cp_run, name):
    ranks, reference, _ = cp_run
    for rank in range(WORLD):
        assert rel_err(ranks[rank][f"{name}.out"], reference["outputs"][0]) <= OUT_REL_ERR


@pytest.mark.parametrize("name", CP_LAYOUTS)
def test_each_rank_holds_its_share_of_the_tokens(cp_run, name):
    """47 tokens pad to 48: 24 per CP rank, and 12 per rank under CP × SP."""
    ranks, _, _ = cp_run
    t, h, w = LATENTS[0]
    tokens = t * (h // 2) * (w // 2) + 2
    sizes = CP_LAYOUTS[name]
    split = sizes["cp"] * (sizes["tp"] if sizes.get("sp") else 1)
    for rank in range(WORLD):
        assert ranks[rank][f"{name}.local_tokens"].item() == -(-tokens // split)


def check_losses(ranks, reference, name):
    """Training and forward-only losses of every rank against the one-process losses, within
    LOSS_REL_ERR of the loss scale of the micro-batches the rank ran (see LOSS_REL_ERR)."""
    for rank in range(WORLD):
        want = expected_loss(reference, ranks, name, rank).item()
        scale = sum(reference["loss_scales"][i] for i in ranks[rank][f"{name}.batches"]) / len(
            ranks[rank][f"{name}.batches"]
        )
        for kind in ("loss", "eval_loss"):
            got = ranks[rank][f"{name}.{kind}"].item()
            assert abs(got - want) <= LOSS_REL_ERR * scale, (rank, kind, got, want, scale)


@pytest.mark.parametrize("name", CP_LAYOUTS)
def test_loss_matches_single_process(cp_run, name):
    ranks, reference, _ = cp_run
    check_losses(ranks, reference, name)


@pytest.mark.parametrize("name", CP_LAYOUTS)
def test_gradients_match_single_process(cp_run, name):
    ranks, reference, _ = cp_run
    check_gradients(ranks, reference, name)


@pytest.mark.parametrize("name", CP_LAYOUTS)
def test_memory_estimate_of_each_rank(cp_run, name):
    """mugv_megatron.memory against megatron's own CP layouts: the parameters on each rank, and the
    bytes autograd saves in a layer (the CP-gathered keys and values whole) for the first
    micro-batch (47 tokens, padded to 48), float32. Bound 1% (LayerNorm statistics left out)."""
    from mugv_megatron import memory

    ranks, _, batches = cp_run
    sizes = CP_LAYOUTS[name]
    b, _, t, h, w = batches[0]["x"].shape
    sample = memory.Sample(tokens=t * (h // 2) * (w // 2) + 2, text=batches[0]["y"].shape[2], latent_voxels=t * h * w)
    # dit.build_model's core attention: megatron's unfused one.
    lay = memory.Layout(tp=sizes["tp"], sp=sizes.get("sp", False), cp=sizes["cp"], micro_batch=b, attention="megatron")
    want = memory.kept_activations(memory.layer_activations(SMALL, sample, lay, memory.Dtypes(4, 4, 4)), "none")
    per_layer, embedders, final = memory.rank_parameters(SMALL, sizes["tp"])
    for rank in range(WORLD):
        assert ranks[rank][f"{name}.numel"].item() == per_layer * SMALL.depth + embedders + final
        got = ranks[rank][f"{name}.saved_layer_bytes"].item()
        assert abs(want / got - 1) <= 0.01, (rank, want, got)


def test_the_loss_bound_is_on_the_scale_of_the_terms():
    """The failure the |loss|-relative bound gave (a loaded 2-core machine, rank 2 of cp2_dp2,
    micro-batch 2): |Δ| 1.5e-8 on a loss of -3.0e-4 whose terms average 1.09 in magnitude. That
    is float32 round-off of a cancelling sum, and it moves with the kernels torch picks for the
    CPU: the one-process loss itself is -2.98811e-4 on AVX-512, -2.98798e-4 on AVX2 and
    -2.98755e-4 on the portable kernels (ATEN_CPU_CAPABILITY; bit-identical across thread counts
    on one path). The bound on the loss scale keeps the check's meaning (1e-5 of the terms) and
    holds these; a real error (a wrong CP scaling doubles a loss) still fails it."""
    got, want, scale = -0.0002988146443385631, -0.00029879974317736924, 1.0882716
    assert abs(got - want) > LOSS_REL_ERR * abs(want)  # the old bound: the flaky failure
    assert abs(got - want) <= LOSS_REL_ERR * scale
    for portable in (-2.98798e-4, -2.98755e-4):
        assert abs(portable - -2.98811e-4) <= LOSS_REL_ERR * scale
    assert abs(2 * want - want) > LOSS_REL_ERR * scale
