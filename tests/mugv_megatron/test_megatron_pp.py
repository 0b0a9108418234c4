"""Pipeline parallelism equals the one-process model: loss and every parameter gradient.

The 4-layer model is split over two stages (layers 0–1 and 2–3). Every stage holds the
embedders (patch, timestep, fps, caption, start/end tokens, timestep_block); only the last holds
the final layer. Layouts, run in the spawn shared with tests/mugv_megatron/test_megatron_cp.py:
* PP = 2 × DP = 2, one micro-batch per replica;
* PP = 2 × TP = 2 with sequence parallelism, two micro-batches of different lengths;
* PP = 2 × CP = 2, the same two micro-batches.
Every stage loads its own slice of a release-layout checkpoint. After the schedule and
megatron's finalize_model_grads, every copy of every parameter (each stage's embedders, each
TP shard, each CP/DP replica) must hold the one-process gradient: the embedders' grads are only
right if they are summed over the stages, which the reference trainer omits.

Stage loading itself is tested in this process (no spawn) with explicitly placed stages.
"""

import pytest
import torch

from mugv_megatron.model import build as dit
from mugv_megatron.model.dit import MUGDiT
from mugv_megatron.model.spec import get_local_layer_spec
from mugv_megatron.model.transformer_config import make_transformer_config
from mugv_megatron.parallel import pipeline_parallel as pipeline
from tests.mugv_megatron.test_megatron_cp import (
    PP_LAYOUTS,
    SMALL,
    all_layouts,
    check_gradients,
    check_losses,
    random_release_state,
)

LAYERS_PER_STAGE = SMALL.depth // 2


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory):
    return all_layouts(tmp_path_factory)


@pytest.mark.parametrize("name", PP_LAYOUTS)
def test_loss_matches_single_process(pp_run, name):
    ranks, reference, _ = pp_run
    check_losses(ranks, reference, name)


@pytest.mark.parametrize("name", PP_LAYOUTS)
def test_gradients_match_single_process(pp_run, name):
    ranks, reference, _ = pp_run
    check_gradients(ranks, reference, name)


@pytest.mark.parametrize("name", PP_LAYOUTS)
def test_stages_hold_their_layers_and_replicated_embedders(pp_run, name):
    ranks, reference, _ = pp_run
    prefix = f"{name}.grad."
    by_stage = {}
    for res in ranks:
        names = {k[len(prefix) :] for k in res if k.startswith(prefix)}
        by_stage.setdefault(res[f"{name}.pp_rank"].item(), []).append(names)
    assert sorted(by_stage) == [0, 1]
    embedders = {n for n in reference["grads"] if not n.startswith(("decoder.", "final_layer."))}
    for stage, name_sets in by_stage.items():
        layers = range(stage * LAYERS_PER_STAGE, (stage + 1) * LAYERS_PER_STAGE)
        for names in name_sets:
            held_layers = {int(n.split(".")[2]) for n in names if n.startswith("decoder.")}
            assert held_layers == set(layers), (stage, held_layers)
            assert embedders <= names
            assert any(n.startswith("final_layer.") for n in names) == (stage == 1)


# --- stage loading (one process) --------------------------------------------------------------


@pytest.fixture(scope="module")
def release_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("megatron_pp_weights") / "weights.safetensors"
    full = random_release_state(path)
    from safetensors.torch import load_file

    return full, load_file(path)


def build_stage(offset, count, *, first, last):
    tc = make_transformer_config(SMALL, pipeline_parallel_size=1)
    return MUGDiT(
        SMALL, tc, get_local_layer_spec(), pre_process=first, post_process=last, layer_offset=offset, num_layers=count
    )


def test_each_stage_loads_its_own_layer_slice(release_weights):
    full, state = release_weights
    want = full.state_dict()
    for stage in range(2):
        offset = stage * LAYERS_PER_STAGE
        model = build_stage(offset, LAYERS_PER_STAGE, first=stage == 0, last=stage == 1)
        pipeline.load_release_state(model, state, source="weights")
        got = model.state_dict()
        assert any(k.startswith("final_layer.") for k in got) == (stage == 1)
        for key, value in got.items():
            if key.endswith("_extra_state"):
                continue
            if key.startswith("decoder.layers."):
                index, rest = key[len("decoder.layers.") :].split(".", 1)
                key = f"decoder.layers.{int(index) + offset}.{rest}"
            assert torch.equal(value, want[key]), key


def test_tensor_missing_from_another_stage_is_named(release_weights):
    _, state = release_weights
    broken = dict(state)
    del broken["blocks.3.mlp.fc2.bias"]
    first_stage = build_stage(0, LAYERS_PER_STAGE, first=True, last=False)
    with pytest.raises(ValueError, match=r"missing tensors \(1\): blocks\.3\.mlp\.fc2\.bias"):
        pipeline.load_release_state(first_stage, broken, source="weights")


def test_checkpoint_with_a_wrong_layer_count_fails_on_every_stage(release_weights):
    """A 5-layer checkpoint for the 4-layer model: even the stage whose own layers are all
    present refuses it, naming the extra layer."""
    _, state = release_weights
    deeper = dict(state)
    deeper.update({k.replace("blocks.3.", "blocks.4."): v for k, v in state.items() if k.startswith("blocks.3.")})
    first_stage = build_stage(0, LAYERS_PER_STAGE, first=True, last=False)
    with pytest.raises(ValueError, match=r"unexpected tensors \(\d+\): blocks\.4\."):
        pipeline.load_release_state(first_stage, deeper, source="weights")


def test_stage_beyond_the_model_depth_fails():
    with pytest.raises(ValueError, match=r"layers \[2, 5\) are not within the model's 4 layers"):
        build_stage(LAYERS_PER_STAGE, 3, first=False, last=True)


def test_pipeline_split_needs_a_divisible_depth():
    with pytest.raises(ValueError, match="depth 4 is not divisible by the pipeline-parallel size 3"):
        make_transformer_config(SMALL, pipeline_parallel_size=3)


def test_later_stage_without_an_input_tensor_fails(release_weights):
    _, state = release_weights
    model = build_stage(LAYERS_PER_STAGE, LAYERS_PER_STAGE, first=False, last=True)
    pipeline.load_release_state(model, state, source="weights")
    from tests.mugv_megatron.test_megatron_cp import make_micro_batches, model_inputs

    args, kwargs = model_inputs(make_micro_batches()[1])
    with pytest.raises(
        ValueError,
        match=r"input tensor from the previous stage must be "
        r"\[14, 2, 96\], got None",
    ):
        model(*args, **kwargs)


def test_grads_of_every_parameter_are_compared(pp_run):
    """Guard against a vacuous comparison: the reference grads are non-zero everywhere."""
    _, reference, _ = pp_run
    for name, grad in reference["grads"].items():
        assert grad.abs().max() > 0, name
    assert len(reference["grads"]) == len(list(dit.build_model(SMALL, perform_initialization=False).parameters()))


@pytest.mark.parametrize("name", PP_LAYOUTS)
def test_parameters_of_each_stage_are_the_estimate(pp_run, name):
    """mugv_megatron.memory counts a stage's parameters as megatron builds them: its layers' TP
    shards, every embedder, the final layer on the last stage only."""
    from mugv_megatron import memory

    ranks, _, _ = pp_run
    sizes = PP_LAYOUTS[name]
    for res in ranks:
        stage = res[f"{name}.pp_rank"].item()
        assert res[f"{name}.numel"].item() == memory.stage_parameters(SMALL, sizes["tp"], sizes["pp"], stage)
