"""A tiny LoRA fine-tune end to end on both backends (issue 28): docs/training_recipe.md §6's
commands, in order, in this process (the trainers' flags parsed as their `__main__` parses them).

    JAX       train configs/tiny.py:lora from a release file; SIGTERM after step 1; resume to 2
    export    python -m converters export-peft (the adapters' EMA) → read back bit-exact
    merge     python -m converters merge → a release file that samples like base + adapters
    Megatron  train continuing from the PEFT adapter; SIGTERM after step 1; resume to 2
    convert   python -m converters convert --adapters Megatron → JAX, and JAX → Megatron → JAX

Substitutions for the CPU (stated): the tiny golden release weights as `dit.pt`, the synthetic
source instead of prepared shards (tests/cross_backend/test_release_finetune_journey.py runs
those), 2 steps, no warm-up (so step 1 moves the adapters), synchronous checkpoints, the JAX mesh
as fsdp over the 8 test devices.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from mugv.io import peft
from mugv.io.mismatch import IncompatibleCheckpoint
from tests.doc_commands import doc_block

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "tests" / "golden" / "dit_tiny" / "weights.safetensors"
TEST_FLAGS = [
    "--config.num_steps=2",
    "--config.checkpoint_every=2",
    # The 8 test devices as one fsdp axis: orbax writes a replicated array in slices, one compiled
    # slice per array and device (a 40 s save of the tiny state); fsdp shards them instead.
    "--config.mesh.ici.data=1",
    "--config.mesh.ici.fsdp=-1",
    "--config.log_every=1",
    "--config.async_checkpoint=False",
    "--config.optim.warmup_steps=0",
]
# Sampling the merged release vs base + adapters: float32, the update folded into W before the
# matmul instead of after it; relative to the largest latent.
SAMPLE_REL = 1e-5


def _commands(home: Path) -> list[list[str]]:
    subs = {
        "dit.pt": str(WEIGHTS),
        "configs/tiny.py:lora": f"{ROOT / 'configs' / 'tiny.py'}:lora",
        "--config.data.source=shards --config.data.path=data/": "--config.data.buckets=((2,4,4,8),)",
        "runs/lora_mcore": str(home / "lora_mcore"),
        "runs/lora": str(home / "lora"),
        "lora_peft": str(home / "lora_peft"),
        "dit_lora.safetensors": str(home / "dit_lora.safetensors"),
        "lora_jax": str(home / "lora_jax"),
    }
    return doc_block("docs/training_recipe.md", "lora", subs)


def _parse_train(argv: list[str]):
    """(config, workdir) of a trainer command line, parsed by the flags its __main__ defines."""
    from absl import flags
    from ml_collections import config_flags

    args = ["train", *argv[3:], *TEST_FLAGS]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=args)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(args)
    return fv.config, fv.workdir


def _train_with_sigterm(backend_cls, train, config, workdir, adapters_of):
    """Run with a SIGTERM after step 1, then resume; returns (first summary, the resumed
    one, the adapters before the first step)."""
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        real = backend_cls.train_step

        def step(self, batch):
            if self.step == 0:
                seen["start"] = adapters_of(self)
            out = real(self, batch)
            if self.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        mp.setattr(backend_cls, "train_step", step)
        first = train(config, workdir)
    return first, train(config, workdir), seen["start"]


def _converters(argv: list[str]) -> None:
    from converters.cli import main

    assert argv[:3] == ["python", "-m", "converters"], argv
    assert main(argv[3:]) == 0, argv


def _numpy(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _jax_adapters(backend) -> dict:
    from mugv_jax.dit import lora as dit_lora

    return dit_lora.to_release(_numpy(backend.state["params"]))


def _megatron_adapters(backend) -> dict:
    from mugv_megatron.model import lora as megatron_lora

    return {k: v.numpy().copy() for k, v in megatron_lora.release_adapters(backend.trainer.module).items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    from mugv_jax.train import backend as jax_train
    from mugv_megatron.train import backend as megatron_train

    home = tmp_path_factory.mktemp("lora")
    train_jax, export, merge, train_megatron, convert = _commands(home)
    out = {"home": home}
    config, workdir = _parse_train(train_jax)
    out["jax"] = _train_with_sigterm(jax_train.JaxBackend, jax_train.train, config, workdir, _jax_adapters)
    out["jax_workdir"] = workdir
    _converters(export)
    _converters(merge)
    config, workdir = _parse_train(train_megatron)
    out["megatron"] = _train_with_sigterm(
        megatron_train.MegatronBackend, megatron_train.train, config, workdir, _megatron_adapters
    )
    out["megatron_workdir"] = workdir
    _converters(convert)
    return out


def test_jax_lora_run_resumes_after_sigterm_with_the_base_frozen(journey):
    from mugv.config import get_config
    from mugv.lora import FreezeConfig, LoraConfig, init_adapters
    from mugv_jax.dit import lora as dit_lora
    from mugv_jax.train.backend import init_params_from

    first, resumed, start = journey["jax"]
    assert first["stopped_by"] == "sigterm" and first["step"] == 1
    assert resumed["stopped_by"] == "num_steps" and resumed["step"] == 2 and np.isfinite(resumed["loss"])
    tiny, lora = get_config("tiny"), LoraConfig(rank=4, alpha=4.0)
    assert _equal(start, init_adapters(tiny, lora))  # the definition's fresh adapters (B = 0)
    # After two steps the frozen base is still the release file's, bit for bit.
    _, base = dit_lora.split(init_params_from(str(WEIGHTS), tiny), lora, FreezeConfig())
    frozen = _numpy(resumed["state"]["frozen"])
    from mugv.layouts.jax import flatten

    want, got = flatten(base), flatten(frozen)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    trained = dit_lora.to_release(_numpy(resumed["state"]["params"]))
    assert min(float(np.abs(v).max()) for k, v in trained.items() if ".lora_B." in k) > 0  # every B moved


def test_exported_peft_adapter_is_the_runs_ema_bit_exact(journey):
    from converters import adapters
    from mugv.config import get_config

    lora, exported = peft.read(str(journey["home"] / "lora_peft"), get_config("tiny"))
    _, run_lora, ema = adapters.read(f"jax:{journey['jax_workdir']}/checkpoints", weights="ema")
    assert lora == run_lora and _equal(exported, ema)
    _, _, raw = adapters.read(f"jax:{journey['jax_workdir']}/checkpoints")
    assert not _equal(raw, ema)  # the EMA is what was exported, not the raw adapters


def test_merged_release_samples_like_base_plus_adapters(journey):
    import jax

    from mugv.config import get_config
    from mugv.io import null_text as null_lib
    from mugv.io.weights import open_weights
    from mugv.layouts.jax import unflatten
    from mugv_jax.dit import checkpoint as dit_checkpoint
    from mugv_jax.dit import lora as dit_lora
    from mugv_jax.dit.model import RuntimeOptions
    from mugv_jax.sample import sampler

    tiny = get_config("tiny")
    merged_path = str(journey["home"] / "dit_lora.safetensors")
    lora, adapters = peft.read(str(journey["home"] / "lora_peft"), tiny)

    def params(path):
        return unflatten(dit_checkpoint.params_from_release_items(open_weights(path, model=tiny).items(), tiny))

    base_plus = dit_lora.merge(params(str(WEIGHTS)), dit_lora.from_release(adapters, tiny))
    null = null_lib.find_sidecar(merged_path)
    assert null is not None and "null_text" in null[1]  # the run's trained-against null caption
    rng = np.random.default_rng(0)
    y = rng.standard_normal((1, 1, 8, tiny.text_dim)).astype(np.float32)
    mask = np.ones((1, 8), np.int32)

    def sample(p, options):
        velocity = sampler.make_guided_velocity_from_params(p, tiny, options)
        z = sampler.sample(
            None, np.zeros((1, tiny.in_channels, 2, 4, 4), np.float32), y, mask, null[0][None, None, :8],
            np.ones((1, 8), np.int32), height=32, width=32, num_steps=2, guidance_scale=4.0,
            key=jax.random.PRNGKey(0), fps=24.0, velocity_fn=velocity,
        )  # fmt: skip
        return np.asarray(z)

    want = sample(base_plus, RuntimeOptions(lora_scale=lora.scale))
    got = sample(params(merged_path), RuntimeOptions())
    base = sample(params(str(WEIGHTS)), RuntimeOptions())
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"merged vs base+adapters: {err:.2e} of the largest latent")
    assert err <= SAMPLE_REL
    assert float(np.abs(base - want).max() / np.abs(want).max()) > 100 * SAMPLE_REL  # the adapters act


def test_megatron_continues_from_the_peft_adapter_and_resumes_after_sigterm(journey):
    from mugv.config import get_config

    first, resumed, start = journey["megatron"]
    assert first["stopped_by"] == "sigterm" and first["step"] == 1
    assert resumed["stopped_by"] == "num_steps" and resumed["step"] == 2 and np.isfinite(resumed["loss"])
    _, imported = peft.read(str(journey["home"] / "lora_peft"), get_config("tiny"))
    assert _equal(start, imported)  # the run started from the PEFT adapter, bit for bit


def test_adapters_convert_between_backends_bit_exact(tmp_path, journey):
    from converters import adapters

    megatron_run = f"megatron:{journey['megatron_workdir']}/checkpoints"
    _, _, trained = adapters.read(megatron_run)
    _, _, converted = adapters.read(f"jax:{journey['home'] / 'lora_jax'}")
    assert _equal(trained, converted)  # the documented Megatron → JAX conversion
    # JAX run → Megatron adapter-only → JAX adapter-only: the same bits.
    jax_run = f"jax:{journey['jax_workdir']}/checkpoints"
    _converters(
        ["python", "-m", "converters", "convert", "--src", jax_run, "--dst", f"megatron:{tmp_path / 'm'}", "--adapters"]
    )
    _converters(
        [
            "python",
            "-m",
            "converters",
            "convert",
            "--src",
            f"megatron:{tmp_path / 'm'}",
            "--dst",
            f"jax:{tmp_path / 'j'}",
            "--adapters",
        ]
    )
    _, lora0, a0 = adapters.read(jax_run)
    _, lora1, a1 = adapters.read(f"jax:{tmp_path / 'j'}")
    assert lora0 == lora1 and _equal(a0, a1)


@pytest.mark.parametrize("backend", ["jax", "megatron"])
def test_resume_with_another_lora_config_is_refused_naming_both(journey, backend):
    from mugv.run.config import as_run_config

    config, workdir = _parse_train(_commands(journey["home"])[0 if backend == "jax" else 3])
    config = as_run_config(config)
    other = config.replace(lora=config.lora.__class__(rank=2, alpha=4.0))
    if backend == "jax":
        from mugv_jax.train.backend import train
    else:
        from mugv_megatron.train.backend import train
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(IncompatibleCheckpoint, match="'rank': 4.*'rank': 2"):
        train(other, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved aside
