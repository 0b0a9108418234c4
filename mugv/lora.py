"""LoRA, defined once for every backend: which linears get adapters, their shapes, scale and
initial values (the reference Megatron trainer's `--lora`: PEFT, gaussian A, B = 0).

A target is a Megatron module name (what PEFT's `target_modules` matches); each names one or more
sites per block, the release's linears. An adapter of a site is two tensors with release-style
names, stored like a torch Linear's weight ([out, in]):

    blocks.{i}.<site>.lora_A.weight   [rank, in]    gaussian, std 1/rank (PEFT's "gaussian")
    blocks.{i}.<site>.lora_B.weight   [out, rank]   zeros, so a fresh adapter changes nothing

and the layer computes  y = W x + b + (alpha / rank) · B (A x).  The initial values come from
numpy seeded by (init_seed, block, site), so both backends start from the same bits, and the
converters and the PEFT export map adapters by name like any weight.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mugv.config import DiTConfig


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted linear of a block: its release module (after `blocks.{i}.`), its Megatron
    target, and how Megatron splits its base over tensor parallelism."""

    release: str
    target: str
    parallel: str  # "column" (output split) | "row" (input split)
    in_dim: str  # DiTConfig size of the input ("hidden_size" | "mlp_hidden_size")
    out_dim: str
    out_mult: int = 1  # fused outputs: 3 for qkv, 2 for kv

    def shape_in(self, config: DiTConfig) -> int:
        return getattr(config, self.in_dim)

    def shape_out(self, config: DiTConfig) -> int:
        return self.out_mult * getattr(config, self.out_dim)


SITES: tuple[Site, ...] = (
    Site("attn.qkv", "linear_qkv", "column", "hidden_size", "hidden_size", 3),
    Site("attn.proj", "linear_proj", "row", "hidden_size", "hidden_size"),
    Site("cross_attn.q_linear", "linear_q", "column", "hidden_size", "hidden_size"),
    Site("cross_attn.kv_linear", "linear_kv", "column", "hidden_size", "hidden_size", 2),
    Site("cross_attn.proj", "linear_proj", "row", "hidden_size", "hidden_size"),
    Site("mlp.fc1", "linear_fc1", "column", "hidden_size", "mlp_hidden_size"),
    Site("mlp.fc2", "linear_fc2", "row", "mlp_hidden_size", "hidden_size"),
)
# The reference trainer's target list (megatron-trainer.md §4.6), in its order.
TARGETS: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_kv", "linear_q", "linear_fc1", "linear_fc2")

BASE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")

# Release modules (top-level names of the release state dict) that `config.freeze.modules` may name.
MODULES: tuple[str, ...] = (
    "start_token",
    "end_token",
    "x_embedder",
    "t_embedder",
    "fps_embedder",
    "t_block",
    "y_embedder",
    "blocks",
    "final_layer",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`config.lora`: low-rank adapters on `targets` (off while rank is 0). When on, every base
    weight is frozen and only the adapters train (float32)."""

    rank: int = 0
    alpha: float = 32.0  # the update is scaled by alpha / rank (reference: 32 / 64 = 0.5)
    targets: tuple[str, ...] = TARGETS
    init_seed: int = 0  # A's gaussian draws (B starts at zero)
    dropout: float = 0.0
    # A PEFT adapter directory (mugv/io/peft.py) to continue training from, instead of the fresh
    # start; its rank, alpha and targets must be these.
    init_from: str = ""
    # How the frozen base weights are stored while the adapters train (float32 always): bfloat16
    # halves the base's memory; the forward then computes with the rounded base.
    base_dtype: str = "float32"

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"--config.lora.rank must be >= 0 (0 = off), got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"--config.lora.alpha must be > 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"--config.lora.targets={self.targets!r}: each at most once, from {', '.join(TARGETS)}"
                + (f" ({unknown} unknown)" if unknown else "")
            )
        if self.rank and not self.targets:
            raise ValueError("--config.lora.targets is empty: name at least one target or set --config.lora.rank=0")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"--config.lora.base_dtype={self.base_dtype!r}: choose from {', '.join(BASE_DTYPES)}")
        if self.base_dtype != "float32" and not self.rank:
            raise ValueError(
                f"--config.lora.base_dtype={self.base_dtype!r} applies to the frozen base under LoRA: "
                "set --config.lora.rank > 0 or leave base_dtype at float32"
            )
        if self.dropout != 0.0:
            # Both backends would have to draw the same dropout masks (mugv.rng); not built yet.
            raise ValueError(f"--config.lora.dropout={self.dropout}: only 0.0 is supported")

    @property
    def on(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def sites(self) -> tuple[Site, ...]:
        return tuple(s for s in SITES if s.target in self.targets)


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
    """`config.freeze`: whole release modules kept at their starting values (no gradients, no
    optimizer state), e.g. `("y_embedder",)` for the reference's --freeze-context-embedder."""

    modules: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown:
            raise ValueError(f"--config.freeze.modules: {unknown} are not release modules; choose from {MODULES}")


def identity(lora: LoraConfig, freeze: FreezeConfig) -> dict:
    """What a checkpoint's state depends on (a resume must match it): the adapters' shapes and
    scale, the stored base's dtype (a bfloat16 base is a rounded one), and the frozen modules.
    `init_from` and `init_seed` only choose a fresh start."""
    if not lora.on:
        return {"lora": None, "freeze": list(freeze.modules)}
    return {
        "lora": {
            "rank": lora.rank,
            "alpha": float(lora.alpha),
            "targets": list(lora.targets),
            "base_dtype": lora.base_dtype,
        },
        "freeze": list(freeze.modules),
    }


def stored(run_config: dict | None) -> tuple[LoraConfig, FreezeConfig]:
    """The LoRA and frozen modules a checkpoint's stored run config records (one stored without
    these sections, or none at all: no LoRA, nothing frozen)."""
    saved = run_config if isinstance(run_config, dict) else {}
    section, freeze = saved.get("lora") or {}, saved.get("freeze") or {}
    frozen = FreezeConfig(modules=tuple(freeze.get("modules") or ()))
    if not int(section.get("rank", 0)):
        return LoraConfig(), frozen
    lora = LoraConfig(
        rank=int(section["rank"]),
        alpha=float(section.get("alpha", LoraConfig.alpha)),
        targets=tuple(section.get("targets", TARGETS)),
        init_seed=int(section.get("init_seed", 0)),
        base_dtype=section.get("base_dtype", "float32"),
    )
    return lora, frozen


def saved_identity(run_config: dict | None) -> dict:
    """`identity` of the run config a checkpoint stored."""
    return identity(*stored(run_config))


def adapter_name(block: int, site: Site, which: str) -> str:
    """Release-style name of an adapter tensor; `which` is "A" or "B"."""
    return f"blocks.{block}.{site.release}.lora_{which}.weight"


def adapter_schema(config: DiTConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """{release-style name: shape} of every adapter tensor (empty while LoRA is off)."""
    out = {}
    if not lora.on:
        return out
    for i in range(config.depth):
        for site in lora.sites():
            out[adapter_name(i, site, "A")] = (lora.rank, site.shape_in(config))
            out[adapter_name(i, site, "B")] = (site.shape_out(config), lora.rank)
    return out


def check_adapters(where: str, adapters: dict, config: DiTConfig, lora: LoraConfig) -> None:
    """Refuse release-named adapters that are not exactly `lora`'s for `config` (naming what is
    missing, unexpected or mis-shaped)."""
    want = adapter_schema(config, lora)
    found = {k: tuple(np.shape(v)) for k, v in adapters.items()}
    if found != want:
        wrong = sorted(k for k in set(found) & set(want) if found[k] != want[k])
        raise ValueError(
            f"{where}: the tensors do not match a rank-{lora.rank} adapter of this model on {lora.targets}: "
            f"missing {sorted(set(want) - set(found))[:4]}, unexpected {sorted(set(found) - set(want))[:4]}, "
            f"wrong shapes {wrong[:4]}"
        )


def init_adapter(config: DiTConfig, lora: LoraConfig, block: int, site: Site) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one site at the start of training, float32, release layout."""
    index = SITES.index(site)
    gen = np.random.default_rng([lora.init_seed, block, index])
    a = (gen.standard_normal((lora.rank, site.shape_in(config))) / lora.rank).astype(np.float32)
    b = np.zeros((site.shape_out(config), lora.rank), np.float32)
    return a, b


def init_adapters(config: DiTConfig, lora: LoraConfig) -> dict[str, np.ndarray]:
    """Every adapter tensor at the start of training, by release-style name."""
    out = {}
    if not lora.on:
        return out
    for i in range(config.depth):
        for site in lora.sites():
            out[adapter_name(i, site, "A")], out[adapter_name(i, site, "B")] = init_adapter(config, lora, i, site)
    return out


def is_frozen(release_name: str, lora: LoraConfig, freeze: FreezeConfig) -> bool:
    """Does a base weight stay fixed? All of them under LoRA; else those of `freeze.modules`."""
    return lora.on or release_name.split(".", 1)[0] in freeze.modules


def merged_weight(weight: np.ndarray, a: np.ndarray, b: np.ndarray, lora: LoraConfig) -> np.ndarray:
    """A base weight [out, in] with its adapter folded in: W + scale · B·A (float32)."""
    w = np.asarray(weight, np.float32)
    return (w + np.float32(lora.scale) * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))).astype(w.dtype)


def merge_release(items, adapters: dict[str, np.ndarray], lora: LoraConfig):
    """Yield release (name, tensor) pairs with every adapted linear's weight merged, one tensor at
    a time (`items`: the base's (name, tensor) pairs; `adapters`: release-named)."""
    used = set()
    for name, tensor in items:
        stem = name.removesuffix(".weight")
        a_name, b_name = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
        if name.endswith(".weight") and a_name in adapters:
            used |= {a_name, b_name}
            tensor = merged_weight(tensor, adapters[a_name], adapters[b_name], lora)
        yield name, tensor
    left = sorted(set(adapters) - used)
    if left:
        raise KeyError(f"adapters {left[:4]} have no base weight in the release state")
