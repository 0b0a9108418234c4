"""bench/torch_dit.py and bench/torch_vae.py, the plain-torch speed references of bench/cpu_vs_torch.py,
compute the release models: the golden vectors within their float32 bound, release names and shapes."""

import numpy as np
import torch
from safetensors.numpy import load_file

from bench.torch_dit import TorchDiT
from bench.torch_vae import TorchVAE
from mugv.config import get_config
from mugv.schema import release_schema
from mugv.vae_config import get_vae_config, release_vae_schema
from tests.helpers import GOLDEN, case_inputs, dit_vectors, dit_weights, max_abs

# The golden vectors' float32 bound (docs/reference.md §9; tests/mugv_jax/test_dit_golden.py).
GOLDEN_ATOL = 1e-4


def test_torch_dit_is_the_release_model():
    cfg = get_config("tiny")
    for attention in ("sdpa", "math"):
        model = TorchDiT(cfg, attention)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == release_schema(cfg)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in dit_weights().items()})
        for case in ("t2v", "i2v"):
            args, kwargs = case_inputs(case)
            with torch.no_grad():
                out = model(*map(torch.from_numpy, args), **{k: torch.from_numpy(v) for k, v in kwargs.items()})
            assert max_abs(out.numpy(), dit_vectors()[f"{case}.out"]) <= GOLDEN_ATOL, (attention, case)


def test_torch_vae_is_the_release_model():
    """t24 `full`: 24 frames in three independent 8-frame groups, one decode window."""
    weights = load_file(f"{GOLDEN}/vae_tiny/weights.safetensors")
    golden = load_file(f"{GOLDEN}/vae_tiny/vectors.safetensors")
    model = TorchVAE(get_vae_config("tiny")).eval()
    for preset in ("tiny", "release"):  # names and shapes of the release schema, at both widths
        with torch.device("meta"):  # shapes only: the release VAE is 1.6 GB
            shapes = {k: tuple(v.shape) for k, v in TorchVAE(get_vae_config(preset)).state_dict().items()}
        assert shapes == {k: tuple(v) for k, v in release_vae_schema(get_vae_config(preset)).items()}, preset
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        z = model.encode(torch.from_numpy(golden["t24.in.x"]))
        recon = model.decode(torch.from_numpy(golden["t24.full.z"]))
    assert max_abs(z.numpy(), golden["t24.full.z"]) <= GOLDEN_ATOL
    assert max_abs(recon.numpy(), golden["t24.full.recon"]) <= GOLDEN_ATOL
    assert np.abs(golden["t24.full.recon"]).max() > 1  # a real comparison, not of zeros
