"""The MUG-V video VAE description: a frozen dataclass, its presets and the release tensor schema.

The released VAE (docs/reference.md §6) is a per-frame SDXL-style 2D autoencoder, cut after its mid-block,
followed by a 3D "temporal" autoencoder that compresses every 8 feature frames into one latent
frame. `release` is the shipped `vae.pt`; `tiny` is the configuration of the golden vectors
(tests/golden/vae_tiny: every channel width 1/16 of the release, one ResBlock per stage).

Framework-free on purpose: the JAX module, the converters and the data pipeline all size tensors
from this file. The 24 latent shift/scale constants are *buffers* of the checkpoint, not config:
`RELEASE_LATENT_SHIFT`/`RELEASE_LATENT_SCALE` are only the values a freshly built model starts
with (the release constructor's defaults); a loaded checkpoint always wins.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

Shape = tuple[int, ...]

# The pipeline's own feature scale. The SDXL config's 0.13025 is ignored by the release code.
SCALING_FACTOR = 0.18215
# Frames per temporal-encoder group: three stride-2 time convolutions (8 → 4 → 2 → 1).
TEMPORAL_GROUP = 8
# The decoder's time-upsampling stages are hard-wired in the release, whatever the encoder says.
DECODER_TEMPORAL_UPSAMPLE = (False, True, True)

RELEASE_LATENT_SHIFT = (
    -0.0194091796875,
    0.09619140625,
    -0.796875,
    0.1591796875,
    -0.2578125,
    0.359375,
    -0.3203125,
    -0.287109375,
    -0.0069580078125,
    0.3046875,
    0.310546875,
    -0.451171875,
    -0.1728515625,
    0.369140625,
    0.2177734375,
    -3.075599670410156e-05,
    0.1630859375,
    -0.267578125,
    -0.1962890625,
    -0.1298828125,
    -0.28515625,
    -0.515625,
    0.5859375,
    -0.34375,
)
RELEASE_LATENT_SCALE = (
    0.8817,
    0.6523,
    0.9152,
    1.2117,
    3.3516,
    0.7528,
    0.8177,
    0.8637,
    0.9075,
    2.8875,
    0.8980,
    1.1202,
    1.0003,
    2.5163,
    0.6652,
    1.2573,
    0.7279,
    1.0777,
    1.5159,
    0.8680,
    1.1859,
    1.0484,
    2.4750,
    1.5881,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    # --- spatial: diffusers AutoencoderKL (4 DownEncoderBlock2D / 4 UpDecoderBlock2D) ---
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    # Only sizes the unused encoder.conv_out / decoder.conv_in (they exist for a strict load).
    latent_channels: int = 4
    norm_num_groups: int = 32
    spatial_norm_eps: float = 1e-6
    # --- temporal: MUGVAETemporal ---
    temporal_in_out_channels: int = 512
    latent_embed_dim: int = 24
    embed_dim: int = 24
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (True, True, True)
    temporal_num_groups: int = 32
    # torch.nn.GroupNorm's default; the 2D part uses 1e-6.
    temporal_norm_eps: float = 1e-5
    # --- pipeline ---
    # Pixel frames per temporal-encode call and per decode window (None: the whole clip at once).
    micro_frame_size: int | None = 48
    # Frames per 2D-VAE call (None: all frames at once). Numerically irrelevant, bounds memory.
    micro_batch_size: int | None = 4
    scaling_factor: float = SCALING_FACTOR
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __post_init__(self):
        for name in ("block_out_channels", "channel_multipliers", "temporal_downsample"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.block_out_channels) != 4:
            # Three ×2 spatial stages give the /8 that every geometry helper assumes.
            raise ValueError(f"VAEConfig.block_out_channels needs 4 entries, got {self.block_out_channels}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"spatial width {c} is not divisible by norm_num_groups={self.norm_num_groups}")
        if self.temporal_in_out_channels != self.block_out_channels[-1]:
            raise ValueError(
                f"temporal_in_out_channels={self.temporal_in_out_channels} must equal the 2D feature "
                f"width block_out_channels[-1]={self.block_out_channels[-1]}"
            )
        if len(self.channel_multipliers) != 4:
            # The decoder's hard-wired (False, True, True) upsampling only fits 4 stages.
            raise ValueError(f"VAEConfig.channel_multipliers needs 4 entries, got {self.channel_multipliers}")
        if self.temporal_downsample != (True, True, True):
            # The pipeline groups frames by 8, which only three stride-2 stages compress to one.
            raise ValueError(
                f"VAEConfig.temporal_downsample must be (True, True, True), got {self.temporal_downsample}"
            )
        for c in (*self.temporal_widths, self.temporal_in_out_channels):
            if c % self.temporal_num_groups:
                raise ValueError(
                    f"temporal width {c} is not divisible by temporal_num_groups={self.temporal_num_groups}"
                )
        if self.micro_frame_size is not None and (
            self.micro_frame_size < TEMPORAL_GROUP or self.micro_frame_size % TEMPORAL_GROUP
        ):
            raise ValueError(
                f"VAEConfig.micro_frame_size must be a positive multiple of 8 or None, got {self.micro_frame_size}"
            )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"VAEConfig.micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")

    @property
    def spatial_channels(self) -> int:
        """Width of the 2D features the temporal VAE compresses (512 in the release)."""
        return self.block_out_channels[-1]

    @property
    def temporal_widths(self) -> tuple[int, ...]:
        return tuple(self.filters * m for m in self.channel_multipliers)

    @property
    def micro_latent_frames(self) -> int | None:
        """Latents per decode window (`micro_z_frame_size`): 6 in the release."""
        return None if self.micro_frame_size is None else self.micro_frame_size // TEMPORAL_GROUP

    def replace(self, **changes) -> VAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("block_out_channels", "channel_multipliers", "temporal_downsample"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> VAEConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown VAEConfig fields: {sorted(unknown)}")
        return cls(**d)


VAE_PRESETS: dict[str, VAEConfig] = {
    "release": VAEConfig(),
    # tests/golden/vae_tiny in its `micro16` variant; `.replace(micro_frame_size=None,
    # micro_batch_size=None)` is its `full` variant (same weights).
    "tiny": VAEConfig(
        block_out_channels=(8, 16, 32, 32),
        norm_num_groups=4,
        temporal_in_out_channels=32,
        filters=8,
        num_res_blocks=1,
        temporal_num_groups=4,
        micro_frame_size=16,
        micro_batch_size=4,
    ),
}


def get_vae_config(name_or_config: str | VAEConfig, **overrides) -> VAEConfig:
    if isinstance(name_or_config, VAEConfig):
        cfg = name_or_config
    else:
        try:
            cfg = VAE_PRESETS[name_or_config]
        except KeyError:
            raise ValueError(f"unknown VAE preset {name_or_config!r}; choose one of {sorted(VAE_PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg


def latent_size(config: VAEConfig, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T', h, w) that `encode` produces: the release's `get_latent_size`.

    Chunked: (micro/8)·⌊T/micro⌋ + ⌈(T mod micro)/8⌉ (105 → 14, 73 → 10 for micro 48); whole
    clip: ⌈T/8⌉. Spatial sizes round down (zero pad right/bottom, then a stride-2 conv).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    m = config.micro_frame_size
    if m is None:
        t = math.ceil(num_frames / TEMPORAL_GROUP)
    else:
        full, rest = divmod(num_frames, m)
        t = (m // TEMPORAL_GROUP) * full + math.ceil(rest / TEMPORAL_GROUP)
    return t, height // 8, width // 8


# --- release state-dict schema --------------------------------------------------------------------


def _norm(p: str, c: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.weight", (c,)
    yield f"{p}.bias", (c,)


def _conv2d(p: str, cin: int, cout: int, k: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.weight", (cout, cin, k, k)
    yield f"{p}.bias", (cout,)


def _linear(p: str, cin: int, cout: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.weight", (cout, cin)
    yield f"{p}.bias", (cout,)


def _resnet2d(p: str, cin: int, cout: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.norm1", cin)
    yield from _conv2d(f"{p}.conv1", cin, cout, 3)
    yield from _norm(f"{p}.norm2", cout)
    yield from _conv2d(f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv2d(f"{p}.conv_shortcut", cin, cout, 1)


def _mid_block2d(p: str, c: int) -> Iterator[tuple[str, Shape]]:
    # nn.Module registration order: attentions before resnets.
    a = f"{p}.attentions.0"
    yield from _norm(f"{a}.group_norm", c)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        yield from _linear(f"{a}.{name}", c, c)
    for i in range(2):
        yield from _resnet2d(f"{p}.resnets.{i}", c, c)


def _spatial_schema(cfg: VAEConfig, p: str) -> Iterator[tuple[str, Shape]]:
    ch = cfg.block_out_channels
    n = len(ch)
    e = f"{p}.encoder"
    yield from _conv2d(f"{e}.conv_in", cfg.in_channels, ch[0], 3)
    cin = ch[0]
    for i, cout in enumerate(ch):
        for j in range(cfg.layers_per_block):
            yield from _resnet2d(f"{e}.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < n - 1:
            yield from _conv2d(f"{e}.down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
        cin = cout
    yield from _mid_block2d(f"{e}.mid_block", ch[-1])
    yield from _norm(f"{e}.conv_norm_out", ch[-1])
    yield from _conv2d(f"{e}.conv_out", ch[-1], 2 * cfg.latent_channels, 3)

    d = f"{p}.decoder"
    yield from _conv2d(f"{d}.conv_in", cfg.latent_channels, ch[-1], 3)
    rev = ch[::-1]
    cin = rev[0]
    for i, cout in enumerate(rev):
        for j in range(cfg.layers_per_block + 1):
            yield from _resnet2d(f"{d}.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < n - 1:
            yield from _conv2d(f"{d}.up_blocks.{i}.upsamplers.0.conv", cout, cout, 3)
        cin = cout
    yield from _mid_block2d(f"{d}.mid_block", ch[-1])
    yield from _norm(f"{d}.conv_norm_out", ch[0])
    yield from _conv2d(f"{d}.conv_out", ch[0], cfg.out_channels, 3)


def _conv3d(p: str, cin: int, cout: int, k: int, bias: bool) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.conv.weight", (cout, cin, k, k, k)
    if bias:
        yield f"{p}.conv.bias", (cout,)


def _resblock3d(p: str, cin: int, cout: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.norm1", cin)
    yield from _conv3d(f"{p}.conv1", cin, cout, 3, bias=False)
    yield from _norm(f"{p}.norm2", cout)
    yield from _conv3d(f"{p}.conv2", cout, cout, 3, bias=False)
    if cin != cout:
        yield from _conv3d(f"{p}.conv3", cin, cout, 1, bias=False)


def _temporal_schema(cfg: VAEConfig, p: str) -> Iterator[tuple[str, Shape]]:
    widths = cfg.temporal_widths
    n = len(widths)
    e = f"{p}.encoder"
    yield from _conv3d(f"{e}.conv_in", cfg.temporal_in_out_channels, cfg.filters, 3, bias=False)
    cin = cfg.filters
    for i, cout in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            yield from _resblock3d(f"{e}.block_res_blocks.{i}.{j}", cin if j == 0 else cout, cout)
        cin = cout
    for i in range(n - 1):
        yield from _conv3d(f"{e}.conv_blocks.{i}", widths[i], widths[i], 3, bias=True)
    for j in range(cfg.num_res_blocks):
        yield from _resblock3d(f"{e}.res_blocks.{j}", widths[-1], widths[-1])
    yield from _norm(f"{e}.norm1", widths[-1])
    yield from _conv3d(f"{e}.conv2", widths[-1], 2 * cfg.latent_embed_dim, 1, bias=True)

    yield from _conv3d(f"{p}.quant_conv", 2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1, bias=True)
    yield from _conv3d(f"{p}.post_quant_conv", cfg.embed_dim, cfg.latent_embed_dim, 1, bias=True)

    d = f"{p}.decoder"
    top = widths[-1]
    yield from _conv3d(f"{d}.conv1", cfg.latent_embed_dim, top, 3, bias=True)
    for j in range(cfg.num_res_blocks):
        yield from _resblock3d(f"{d}.res_blocks.{j}", top, top)
    yield from _norm(f"{d}.upsample_block.norm1", top)
    yield from _conv3d(f"{d}.upsample_block.conv1", top, top, 3, bias=False)
    yield from _norm(f"{d}.upsample_block.norm2", top)
    yield from _conv3d(f"{d}.upsample_block.conv2", top, top, 3, bias=False)
    # Built in reverse, stored in index order: block i takes the width of block i+1.
    for i in range(n):
        cin = widths[i + 1] if i + 1 < n else top
        for j in range(cfg.num_res_blocks):
            yield from _resblock3d(f"{d}.block_res_blocks.{i}.{j}", cin if j == 0 else widths[i], widths[i])
    for i, up in enumerate(DECODER_TEMPORAL_UPSAMPLE):
        if up:  # conv_blocks.i follows block_res_blocks.(i+1) and doubles its width for depth-to-space
            yield from _conv3d(f"{d}.conv_blocks.{i}", widths[i + 1], 2 * widths[i + 1], 3, bias=True)
    yield from _norm(f"{d}.norm1", widths[0])
    yield from _conv3d(f"{d}.conv_out", widths[0], cfg.temporal_in_out_channels, 3, bias=True)


def release_vae_schema(config: VAEConfig) -> dict[str, Shape]:
    """Every tensor of the release `vae.pt` for `config`: name → shape (PyTorch layout), in order.

    `logvar` is a scalar parameter; `shift` and `scale` are the [1, C, 1, 1, 1] latent buffers.
    """
    out: dict[str, Shape] = {
        "logvar": (),
        "scale": (1, config.embed_dim, 1, 1, 1),
        "shift": (1, config.embed_dim, 1, 1, 1),
    }
    for name, shape in (*_spatial_schema(config, "spatial_vae.module"), *_temporal_schema(config, "temporal_vae")):
        if name in out:
            raise AssertionError(f"duplicate tensor name {name} in the VAE schema")
        out[name] = shape
    return out


# Fields that steer only the encode/decode orchestration, never a network's weights or arithmetic.
PIPELINE_FIELDS = ("micro_frame_size", "micro_batch_size", "logvar_min", "logvar_max")

BUFFER_NAMES = ("shift", "scale")
# Present in the checkpoint (a strict load needs them) but never read by encode/decode.
UNUSED_IN_FORWARD = (
    "spatial_vae.module.encoder.conv_norm_out",
    "spatial_vae.module.encoder.conv_out",
    "spatial_vae.module.decoder.conv_in",
    "logvar",
)


def schema_num_params(schema: Mapping[str, Shape]) -> int:
    """Parameter count of a schema, buffers (`shift`, `scale`) excluded, as the release counts."""
    return sum(math.prod(s) for k, s in schema.items() if k not in BUFFER_NAMES)
