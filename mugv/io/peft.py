"""LoRA adapters in PEFT's on-disk format (the format owner): a directory with

    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules (release module
                                names), lora_dropout, init_lora_weights "gaussian", bias "none"
    adapter_model.safetensors   base_model.model.<release module>.lora_A.weight [r, in]
                                base_model.model.<release module>.lora_B.weight [out, r]

so `peft.PeftModel.from_pretrained` puts them onto a torch module that has the release's module
names (the official release's own enhancer ships its LoRA this way). Adapter tensors come and go
by their release-style names (mugv/lora.py); the directory is written under a temporary name and
renamed when complete, and an existing one is refused unless `force`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from mugv.config import DiTConfig
from mugv.io.atomic import atomic_output
from mugv.lora import SITES, TARGETS, FreezeConfig, LoraConfig, adapter_schema, check_adapters, identity

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _target_modules(lora: LoraConfig) -> list[str]:
    # Release module suffixes; PEFT matches a module whose name ends with "." + one of them.
    return [s.release for s in SITES if s.target in lora.targets]


def write(path: str, adapters: dict[str, np.ndarray], lora: LoraConfig, config: DiTConfig, *, force=False) -> str:
    """Write release-named adapter tensors (every one of `lora`'s, float32) as a PEFT adapter."""
    expected = adapter_schema(config, lora)
    found = {k: tuple(np.shape(v)) for k, v in adapters.items()}
    if found != expected:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ValueError(
            f"adapters for {path} do not match config.lora (rank {lora.rank}, targets {lora.targets}): "
            f"missing {missing[:4]}, unexpected {extra[:4]}, wrong shapes {wrong[:4]}"
        )
    from safetensors.numpy import save_file

    cfg = {
        "peft_type": "LORA",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": _target_modules(lora),
        "lora_dropout": lora.dropout,
        "init_lora_weights": "gaussian",
        "bias": "none",
        "fan_in_fan_out": False,
        "task_type": None,
        "base_model_name_or_path": None,
        "modules_to_save": None,
        "mugv": {"targets": list(lora.targets), "init_seed": lora.init_seed},
    }
    with atomic_output(path, force=force, make_parent=True) as tmp:
        os.makedirs(tmp)
        tensors = {PREFIX + k: np.asarray(v, np.float32, order="C") for k, v in adapters.items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(cfg, f, indent=2)
    return path


def read(path: str, config: DiTConfig) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(the LoraConfig, release-named float32 adapters) of a PEFT LoRA directory for `config`'s model;
    refuses another adapter type, bias training, dropout, or tensors the model does not have."""
    from safetensors.numpy import load_file

    cfg_path, w_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: a PEFT adapter directory has {CONFIG} and {WEIGHTS}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ValueError(f"{cfg_path}: only plain LoRA adapters (peft_type LORA, bias none) can be read")
    by_release = {s.release: s.target for s in SITES}
    modules = cfg.get("target_modules") or []
    unknown = [m for m in modules if m not in by_release]
    if unknown:
        raise ValueError(f"{cfg_path}: target_modules {unknown} are not MUG-DiT linears ({sorted(by_release)})")
    named = {by_release[m] for m in modules}
    # Ours record their order; another writer's take the reference's.
    targets = tuple(cfg.get("mugv", {}).get("targets") or [t for t in TARGETS if t in named])
    if set(targets) != named:
        raise ValueError(f"{cfg_path}: mugv.targets {targets} disagree with target_modules {modules}")
    lora = LoraConfig(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        targets=targets,
        init_seed=int(cfg.get("mugv", {}).get("init_seed", 0)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
    )
    tensors = load_file(w_path)
    adapters = {k.removeprefix(PREFIX): v.astype(np.float32) for k, v in tensors.items()}
    check_adapters(w_path, adapters, config, lora)
    return lora, adapters


def read_for(lora: LoraConfig, config: DiTConfig) -> dict[str, np.ndarray]:
    """The adapters of `lora.init_from` (a PEFT directory) for a run with `lora`: refused unless
    its rank, alpha and targets are the run's."""
    found, adapters = read(lora.init_from, config)
    # The base's dtype is the run's choice (a PEFT adapter has none): compared as the run's.
    found = dataclasses.replace(found, base_dtype=lora.base_dtype)
    if identity(found, FreezeConfig()) != identity(lora, FreezeConfig()):
        raise ValueError(
            f"--config.lora.init_from={lora.init_from} holds a rank-{found.rank} adapter (alpha {found.alpha}, "
            f"targets {found.targets}), the run's --config.lora is rank {lora.rank} (alpha {lora.alpha}, "
            f"targets {lora.targets}): set --config.lora.rank/alpha/targets to the adapter's"
        )
    return adapters
