"""The run config, typed and built once: what `configs/*.py` describe (an ml_collections dict,
overridable with `--config.a.b=value`) as frozen dataclasses that the run loop, the tasks and
both backends take.

    run = as_run_config(config)        # validated here, once; errors name the --config. flag
    run.model_config                   # the DiTConfig: `model` preset + `model_overrides`
    run.check_batch_split(mesh_shape)  # global batch vs grad_accum_steps vs data parallelism

Defaults live in the dataclasses (here and the sections in mugv/training.py), nowhere else:
`configs/base.py` is `to_config_dict(RunConfig())`. A ConfigDict cannot take keys it does not
have (`--config.x=…` of a missing key fails), so generating it from the declaration is what makes
every field, `model_overrides.<any DiTConfig field>` included, settable from the command line,
and a field added here reaches every config without a second copy of its default.
"""

from __future__ import annotations

import dataclasses
import typing

from mugv.config import DiTConfig, get_config
from mugv.run.typed import ConfigError, flag, from_mapping, to_config_dict
from mugv.training import MegatronOptions, ObjectiveConfig, OptimConfig, PreferenceConfig

__all__ = [
    "ConfigError",
    "RunConfig",
    "LoopConfig",
    "as_run_config",
    "check_batch_split",
    "check_split",
    "dataclass_from",
    "model_config_from",
]

MODES = ("pretrain", "preference")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Validation timesteps, as fractions of the 0..1000 range (mugv/run/validation.py).
DEFAULT_T_VALUES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _overrides_class():
    """`config.model_overrides`: every DiTConfig field, unset (None) unless overridden."""
    hints = typing.get_type_hints(DiTConfig)
    return dataclasses.make_dataclass(
        "ModelOverrides",
        [(f.name, hints[f.name] | None, dataclasses.field(default=None)) for f in dataclasses.fields(DiTConfig)],
        frozen=True,
    )


ModelOverrides = _overrides_class()


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """Sizes of the JAX mesh axes; -1 = all remaining devices (at most one axis)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: the JAX backend's (data, fsdp, tensor, context) mesh: `ici` per slice,
    `dcn` the multi-slice factors."""

    ici: MeshAxes = MeshAxes(data=-1)
    dcn: MeshAxes = MeshAxes()


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """`config.target`: the pod a layout was planned for (configs/mugv_10b.py `:<pod>`): the
    planner's default --devices/--kind. Not read by the trainers."""

    name: str = ""
    kind: str = ""
    devices: int = 0  # all slices together
    slices: int = 1  # `<pod>x<N>`: N slices joined by mesh.dcn


Bucket = tuple[int, int, int, int]  # (latent frames, latent height, latent width, global batch)


def _check_buckets(buckets, path: str, frames: int | None = None) -> None:
    for i, b in enumerate(buckets):
        if min(b) < 1:
            raise ValueError(f"{flag(path)}[{i}]={b}: every size must be >= 1")
        if frames is not None and b[0] != frames:
            raise ValueError(f"{flag(path)}[{i}]={b}: must have {frames} latent frame")


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """`config.data.mix`: image:video mixing (curriculum stage 1). A second child loader of
    single-frame buckets is drawn with probability image_fraction, annealed linearly from
    image_fraction_start to image_fraction_end over anneal_steps (mugv.data.loader.MixedLoader).
    Off while both fractions are 0."""

    image_buckets: tuple[Bucket, ...] = ()  # synthetic: the image child's (1, h, w, batch) buckets
    image_path: str = ""  # shards: the prepared image dataset
    image_fraction_start: float = 0.0
    image_fraction_end: float = 0.0
    anneal_steps: int = 0

    def __post_init__(self):
        for name in ("image_fraction_start", "image_fraction_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--config.data.mix.{name} must be in [0, 1], got {getattr(self, name)}")
        _check_buckets(self.image_buckets, "data.mix.image_buckets", frames=1)

    @property
    def on(self) -> bool:
        return self.image_fraction_start > 0 or self.image_fraction_end > 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`: where a run's batches come from (mugv/run/data.py)."""

    source: str = "synthetic"  # "synthetic" | "shards" (python -m mugv_data prepare)
    path: str = ""  # shards: the prepared dataset (or the --out directory prepare wrote it under)
    batch_size: int = 8  # shards: global batch size for every bucket
    num_workers: int = 0  # shards: grain worker processes
    verify: bool = False  # shards: check every byte against index.json's CRCs at open (sizes always)
    on_bad_shard: str = "refuse"  # shards: "refuse" a missing/changed file, or "exclude" it (loudly)
    max_skipped_records: int = 100  # shards: more unreadable records than this stop the run
    # (latent frames, latent height, latent width, global batch size); one shape per batch.
    buckets: tuple[Bucket, ...] = ((2, 4, 6, 8),)
    text_len: int = 8
    truncate_captions: bool = False  # shards: cut captions longer than text_len (default: refuse)
    num_prompts: int = 4  # synthetic: distinct captions
    fps: float = 24.0
    mix: MixConfig = MixConfig()

    def __post_init__(self):
        if self.source not in ("synthetic", "shards"):
            raise ValueError(f"--config.data.source={self.source!r} is not available (known: 'synthetic', 'shards')")
        if self.on_bad_shard not in ("refuse", "exclude"):
            raise ValueError(f"--config.data.on_bad_shard={self.on_bad_shard!r}: must be 'refuse' or 'exclude'")
        if self.max_skipped_records < 0:
            raise ValueError(f"--config.data.max_skipped_records must be >= 0, got {self.max_skipped_records}")
        if not self.buckets:
            raise ValueError("--config.data.buckets is empty: give at least one (frames, h, w, batch)")
        _check_buckets(self.buckets, "data.buckets")
        for name in ("batch_size", "text_len", "num_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--config.data.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """`config.profile`: a profiler trace of `num_steps` steps from `start_step` (-1 = off)."""

    start_step: int = -1
    num_steps: int = 3


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """`config.sample`: latents sampled from the EMA for the first `count` captions of the first
    batch, written to <workdir>/samples/ every `every` steps (0 = off) and at the end (JAX only)."""

    every: int = 0
    count: int = 2
    steps: int = 10
    cfg_scale: float = 2.0


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """`config.validation`: held-out loss at fixed timesteps with fixed noise every `every` steps
    (0 = off) and at the end (mugv/run/validation.py)."""

    every: int = 0
    num_batches: int = 2
    t_values: tuple[float, ...] = DEFAULT_T_VALUES
    seed: int = 1234
    weights: str = "ema"  # "ema" | "raw"
    path: str = ""  # shards: a held-out prepared dataset


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What the run loop (mugv/run/driver.py) reads: the cadences and limits of a run."""

    num_steps: int
    log_every: int
    checkpoint_every: int
    max_nonfinite_in_a_row: int = 10
    sample_every: int = 0
    profile: ProfileConfig = ProfileConfig()

    def __post_init__(self):
        for name in ("log_every", "checkpoint_every", "max_nonfinite_in_a_row"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--config.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_steps < 0:
            raise ConfigError(f"--config.num_steps must be >= 0, got {self.num_steps}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A DiT training run (both backends; docs/run_loop.md says which fields each honours)."""

    model: str = "tiny"  # mugv.config.PRESETS
    model_overrides: ModelOverrides = ModelOverrides()  # DiTConfig fields replacing the preset's
    # Release file (.pt/.safetensors), jax:DIR[@STEP] or megatron:DIR[@ITER] ("" = random init).
    init_from: str = ""
    # Which weights of a training checkpoint (jax:/megatron:) to start from: "raw" or the "ema"
    # (the curriculum stages hand over the EMA). A release file has one set: it is always used.
    init_weights: str = "raw"
    mode: str = "pretrain"  # "pretrain" | "preference"
    stage: str = ""  # the curriculum stage a config file built (configs/mugv_10b.py); informative
    seed: int = 0
    num_steps: int = 100
    compute_dtype: str = "float32"  # "bfloat16" for real runs
    # JAX backend: attention kernel[+context-parallel mode], remat policy, mesh, and entries
    # (logical axis, mesh axis or axes or None) replacing rows of the sharding table
    # (mugv_jax/parallel/sharding.py DEFAULT_RULES, MaxText's logical_axis_rules).
    attention: str = "xla"
    remat: str = "none"  # none | full | dots | dots_no_batch | offload_dots
    sharding_rules: tuple[tuple[str, object], ...] = ()
    mesh: MeshConfig = MeshConfig()
    target: TargetConfig = TargetConfig()
    optim: OptimConfig = OptimConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    data: DataConfig = DataConfig()
    preference: PreferenceConfig = PreferenceConfig()
    megatron: MegatronOptions = MegatronOptions()  # the Megatron backend's execution settings
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    max_nonfinite_in_a_row: int = LoopConfig.max_nonfinite_in_a_row
    profile: ProfileConfig = ProfileConfig()
    sample: SampleConfig = SampleConfig()
    validation: ValidationConfig = ValidationConfig()

    def __post_init__(self):
        for name, allowed in (
            ("mode", MODES),
            ("init_weights", ("raw", "ema")),
            ("compute_dtype", COMPUTE_DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--config.{name}={getattr(self, name)!r}: must be one of {', '.join(map(repr, allowed))}"
                )
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--config.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for i, rule in enumerate(self.sharding_rules):
            if len(rule) != 2 or not isinstance(rule[0], str):
                raise ConfigError(
                    f"--config.sharding_rules[{i}]={rule!r}: expected (logical axis, mesh axis | (axes…) | None)"
                )
        self.loop()  # validates the cadences
        overrides = {k: v for k, v in dataclasses.asdict(self.model_overrides).items() if v is not None}
        try:
            model = get_config(self.model, **overrides)
        except ValueError as e:
            set_ = " ".join(f"--config.model_overrides.{k}={v}" for k, v in overrides.items())
            raise ConfigError(f"--config.model={self.model!r} {set_}".rstrip() + f": {e}") from None
        object.__setattr__(self, "_model_config", model)

    # --- what the run is made of -------------------------------------------------------------------

    @property
    def model_config(self) -> DiTConfig:
        """The run's model: the `model` preset with `model_overrides` applied (derived once)."""
        return self._model_config

    def loop(self) -> LoopConfig:
        return LoopConfig(
            num_steps=self.num_steps,
            log_every=self.log_every,
            checkpoint_every=self.checkpoint_every,
            max_nonfinite_in_a_row=self.max_nonfinite_in_a_row,
            sample_every=self.sample.every,
            profile=self.profile,
        )

    def starting_weights(self) -> tuple[str, str] | None:
        """(init_from, weights to read) of a fresh start, or None for random weights. A release
        file holds one set of weights, which it gives whatever `init_weights` says: the curriculum
        stages set "ema" for their jax: hand-over, and a release start overrides only init_from."""
        if not self.init_from:
            return None
        from mugv.io.spec import WITH_EMA, parse_spec, resolve

        fmt = parse_spec(self.init_from).format
        if fmt is None:  # an unprefixed path: what is on disk says (a missing one, the reader)
            try:
                fmt = resolve(self.init_from).format
            except (FileNotFoundError, ValueError):
                pass
        return self.init_from, (self.init_weights if fmt in WITH_EMA else "raw")

    def global_batches(self) -> list[tuple[str, int]]:
        """(the flag that sets it, size) of every global batch a step of this run takes."""
        if self.mode == "preference":
            return [(f"--config.preference.batch_size={self.preference.batch_size}", self.preference.batch_size)]
        d = self.data
        if d.source == "shards":  # the loader reads data.batch_size rows for every bucket (and image child)
            return [(f"--config.data.batch_size={d.batch_size}", d.batch_size)]
        out = [(f"--config.data.buckets[{i}]={b}", b[3]) for i, b in enumerate(d.buckets)]
        if d.mix.on:
            out += [(f"--config.data.mix.image_buckets[{i}]={b}", b[3]) for i, b in enumerate(d.mix.image_buckets)]
        return out

    def check_batch_split(self, data_parallel: int | dict, dp_name: str | None = None) -> None:
        """Refuse a global batch that grad_accum_steps micro-batches cannot split evenly over the
        data-parallel ranks: a JAX mesh shape (data × fsdp) or the Megatron data-parallel size."""
        for what, batch in self.global_batches():
            if isinstance(data_parallel, dict):
                check_batch_split(batch, self.optim.grad_accum_steps, data_parallel, what)
            else:
                check_split(batch, self.optim.grad_accum_steps, data_parallel, what, dp_name or str(data_parallel))

    # --- forms ---------------------------------------------------------------------------------

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain data (config.json): every field, the model overrides that are set."""
        d = dataclasses.asdict(self)
        d["model_overrides"] = {k: v for k, v in d["model_overrides"].items() if v is not None}
        return d

    def resolved(self) -> dict:
        """config.json: `to_dict()` and the model it resolves to."""
        return {**self.to_dict(), "model_resolved": self.model_config.to_dict()}

    def to_config_dict(self):
        """The ml_collections ConfigDict of this config (configs/base.py)."""
        return to_config_dict(self)


def as_run_config(config) -> RunConfig:
    """The RunConfig of an ml_collections ConfigDict, a plain mapping (config.json) or a
    RunConfig (returned as is). Missing fields take their defaults; unknown ones are refused."""
    if isinstance(config, RunConfig):
        return config
    to_dict = getattr(config, "to_dict", None)  # a ConfigDict: references resolved
    return from_mapping(RunConfig, to_dict() if callable(to_dict) else dict(config))


def model_config_from(config) -> DiTConfig:
    """The DiTConfig of a run config (`as_run_config(config).model_config`)."""
    return as_run_config(config).model_config


_SECTIONS = {
    OptimConfig: "optim",
    ObjectiveConfig: "objective",
    MegatronOptions: "megatron",
    PreferenceConfig: "preference",
}


def dataclass_from(cls, section):
    """One section of a run config (OptimConfig, ObjectiveConfig, ...) from its mapping, refusing
    fields it does not have (naming the nearest)."""
    return from_mapping(cls, dict(section), _SECTIONS.get(cls, ""))


def check_split(batch: int, accum: int, dp: int, what: str, dp_name: str) -> None:
    """`batch` rows in `accum` micro-batches, each split evenly over `dp` data-parallel ranks (a
    micro-batch that does not divide would be replicated over the ranks it does not divide by)."""
    if accum >= 1 and dp >= 1 and batch % (accum * dp) == 0:
        return
    if batch % accum:
        detail = f"it is not divisible by optim.grad_accum_steps={accum}"
    else:
        detail = (
            f"its micro-batch {batch // accum} (global batch {batch} / optim.grad_accum_steps={accum}) "
            f"is not divisible by {dp_name}"
        )
    if batch % dp == 0:
        fits = [d for d in range(1, batch // dp + 1) if (batch // dp) % d == 0]
        fix = f"set --config.optim.grad_accum_steps to one of {fits}"
    else:
        fix = f"make the global batch a multiple of {dp} (or change the data parallelism)"
    raise ConfigError(
        f"{what}: global batch {batch} is not a multiple of optim.grad_accum_steps × data-parallel "
        f"ranks ({accum} × {dp}): {detail};\n  {fix}"
    )


def check_batch_split(batch: int, accum: int, mesh_shape: dict, what: str = "bucket") -> None:
    """`check_split` for a JAX mesh: batches are sharded over data × fsdp."""
    dp = int(mesh_shape.get("data", 1)) * int(mesh_shape.get("fsdp", 1))
    check_split(batch, accum, dp, what, f"data × fsdp = {dp} (mesh {dict(mesh_shape)})")
