"""The Megatron MUG-DiT (one process, local spec, float32 on CPU) against the golden vectors."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mugv_megatron.model import build as dit

GOLDEN = Path(__file__).parent.parent / "golden" / "dit_tiny"
# Agreement the golden vectors require of any implementation in float32 (docs/reference.md §9).
MAX_ABS_ERR = 1e-4
CASES = ("t2v", "i2v")
ACTIVATIONS = (
    "x_embedder",
    "t_embedder.call0",
    "t_embedder.call1",
    "fps_embedder",
    "t_block.call0",
    "t_block.call1",
    "y_embedder",
    "blocks.0",
    "blocks.1",
    "final_layer",
)


def case_inputs(vectors, case):
    g = lambda k: vectors[f"{case}.in.{k}"]  # noqa: E731
    return (g("x"), g("timestep"), g("y")), dict(
        mask=g("mask"), x_mask=g("x_mask"), fps=g("fps"), frame_indice=g("frame_indice")
    )


@pytest.fixture(scope="module")
def vectors():
    return load_file(GOLDEN / "vectors.safetensors")


@pytest.fixture(scope="module")
def model():
    return dit.load(GOLDEN / "weights.safetensors", "tiny")


@pytest.fixture(scope="module")
def results(model, vectors):
    out = {}
    for case in CASES:
        args, kwargs = case_inputs(vectors, case)
        acts = {}
        with torch.no_grad():
            out[case] = (model(*args, **kwargs, activations=acts), acts)
    return out


def max_abs_err(got, want):
    assert tuple(got.shape) == tuple(want.shape)
    return (got.float() - want.float()).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_output_matches_golden(results, vectors, case):
    out, _ = results[case]
    assert out.dtype == torch.float32
    assert max_abs_err(out, vectors[f"{case}.out"]) <= MAX_ABS_ERR


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
def test_activation_matches_golden(results, vectors, case, name):
    _, acts = results[case]
    assert max_abs_err(acts[name], vectors[f"{case}.act.{name}"]) <= MAX_ABS_ERR


def test_every_golden_tensor_of_the_cases_is_checked(vectors):
    checked = {f"{case}.act.{name}" for case in CASES for name in ACTIVATIONS}
    checked |= {f"{case}.out" for case in CASES}
    golden = {k for k in vectors if k.split(".")[0] in CASES and ".in." not in k}
    assert golden == checked


def test_defaults_are_all_generated_frames_and_consecutive_indices(model, vectors):
    """t2v has every frame generated and frame_indice = 0..T+1: the defaults must give the same."""
    (x, t, y), kwargs = case_inputs(vectors, "t2v")
    assert bool(kwargs["x_mask"].bool().all())
    assert torch.equal(kwargs["frame_indice"], torch.arange(x.shape[2] + 2).expand(x.shape[0], -1))
    with torch.no_grad():
        out = model(x, t, y, mask=kwargs["mask"], fps=kwargs["fps"])
    assert max_abs_err(out, vectors["t2v.out"]) <= MAX_ABS_ERR


def test_conditioning_frames_change_the_output(model, vectors):
    """Guards the i2v check against a model that ignores x_mask."""
    args, kwargs = case_inputs(vectors, "i2v")
    kwargs["x_mask"] = torch.ones_like(kwargs["x_mask"])
    with torch.no_grad():
        out = model(*args, **kwargs)
    assert max_abs_err(out, vectors["i2v.out"]) > 100 * MAX_ABS_ERR


def test_empty_caption_is_rejected(model, vectors):
    args, kwargs = case_inputs(vectors, "t2v")
    kwargs["mask"] = kwargs["mask"].clone()
    kwargs["mask"][1] = 0
    with pytest.raises(ValueError, match=r"samples \[1\] have no valid text token"):
        model(*args, **kwargs)
