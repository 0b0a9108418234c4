"""A training config plus the Megatron-Core section: `--config=configs/mcore.py:tiny`.

The argument names another config in this directory and its argument (`tiny`, `tiny:i2v`,
`mugv_10b:video_720`); the result is that config with `config.megatron` added, so that every
Megatron field can be overridden like any other (`--config.megatron.tp=4`). `mugv_megatron.train`
also accepts a plain config (`--config=configs/tiny.py`) and adds the same defaults itself.
"""
import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def megatron_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        tp=1,                        # tensor-parallel size
        sp=False,                    # sequence parallel (needs tp > 1)
        pp=1,                        # pipeline-parallel size (not wired into the trainer yet)
        cp=1,                        # context-parallel size (not wired into the trainer yet)
        distributed_optimizer=True,  # megatron DistributedOptimizer on CUDA (torch AdamW on CPU)
        use_te=ml_collections.FieldReference(None, field_type=bool),  # None: TE when it imports
        # Parameter dtype: "float32" (the parameters are the master weights; bf16 compute through
        # autocast) or "bfloat16" (bf16 weights, fp32 main weights in the distributed optimizer,
        # as the reference trains). None: bfloat16 when compute_dtype is bfloat16 and the
        # distributed optimizer runs (GPU), else float32.
        params_dtype=ml_collections.FieldReference(None, field_type=str),
        # Activation recompute: "none", "full" (every layer re-run in backward: the reference's
        # setting, least memory, +1 forward of the layers in hardware FLOPs) or "selective" (core
        # attention re-run; only useful with the unfused local attention).
        recompute="none",
        # With the distributed optimizer only (ignored by the torch-AdamW path): reduce-scatter
        # gradient buckets while backward still runs, and all-gather updated parameter buckets
        # during the next forward instead of right after the update.
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        # Checkpoints written by a forked writer while training continues; published (renamed,
        # named in the tracker) once every rank's writer is done.
        async_save=True,
    ))


def with_megatron(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if "megatron" not in config:
        with config.unlocked():
            config.megatron = megatron_section()
    return config


def get_config(arg: str | None = None):
    name, _, sub = (arg or "tiny").partition(":")
    path = os.path.join(_HERE, f"{name}.py")
    if not os.path.isfile(path):
        raise ValueError(f"configs/mcore.py: no config {path} (argument {arg!r})")
    spec = importlib.util.spec_from_file_location(f"_mugv_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return with_megatron(module.get_config(sub) if sub else module.get_config())
