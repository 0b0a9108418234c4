"""The batches of a run, built from `config.data` the same way for every backend.

An iterator yields host batches (dicts of numpy arrays: latents [B, C, F, H, W], y [B, 1, L, D],
mask [B, L], fps [B]) and has `get_state()`/`set_state()` so its position is part of every
checkpoint. Every iterator built here yields *this shard's rows* of each global batch (a shard is
a JAX process or a Megatron data-parallel replica, `shard = (index, count)`), so a global batch
is `count` times the rows a shard sees.

Sources: `synthetic` (caption-dependent latents, mugv.data.synthetic) and `shards` (array_record
datasets written by `python -m mugv_data prepare`, read by mugv.data.loader). With
`config.data.mix` on, an image child (single-frame buckets or an image dataset) and the video
child are mixed with an image share annealed over the steps (mugv.data.loader.MixedLoader).
"""

from __future__ import annotations

from mugv.config import DiTConfig
from mugv.data import synthetic
from mugv.data.loader import MixedLoader, ShardLoader


class ShardSlice:
    """Rows [i·b/n, (i+1)·b/n) of every batch of an iterator that yields global batches (the
    same split as numpy's array_split), with the wrapped iterator's state."""

    def __init__(self, inner, shard: tuple[int, int]):
        self.inner, (self.index, self.count) = inner, shard

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.inner)
        b = next(iter(batch.values())).shape[0]
        if b % self.count:
            raise ValueError(
                f"global batch of {b} samples does not split evenly over {self.count} "
                f"data shards (processes or data-parallel ranks); choose batch sizes "
                f"divisible by {self.count}"
            )
        per = b // self.count
        return {k: v[self.index * per : (self.index + 1) * per] for k, v in batch.items()}

    @property
    def skipped(self) -> int:
        return int(getattr(self.inner, "skipped", 0))

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()


def synthetic_source(config, model_cfg: DiTConfig) -> synthetic.SyntheticTextToLatent:
    d = config.data
    buckets = [synthetic.Bucket(*map(int, b)) for b in d.buckets]
    return synthetic.SyntheticTextToLatent(
        buckets,
        in_channels=model_cfg.in_channels,
        text_dim=model_cfg.text_dim,
        text_len=int(d.text_len),
        num_prompts=int(d.num_prompts),
        fps=float(d.fps),
        seed=int(config.seed),
    )


def image_fraction(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Linear anneal of the image share from `start` to `end` over `anneal_steps`, then constant."""
    if anneal_steps <= 0:
        return float(end)
    return float(start + (end - start) * min(max(step, 0), anneal_steps) / anneal_steps)


def mixing_images(config) -> bool:
    mix = config.data.get("mix")
    return mix is not None and (float(mix.image_fraction_start) > 0 or float(mix.image_fraction_end) > 0)


def build_iterator(config, model_cfg: DiTConfig, shard: tuple[int, int] = (0, 1)):
    """This shard's batch iterator for `config.data` (see the module docstring)."""
    if mixing_images(config):
        return _image_video_iterator(config, model_cfg, shard)
    d = config.data
    if d.source == "synthetic":
        return ShardSlice(synthetic.DataIterator(synthetic_source(config, model_cfg)), shard)
    if d.source != "shards":
        raise ValueError(f"config.data.source={d.source!r} is not available (known: 'synthetic', 'shards')")
    if not d.get("path"):
        raise ValueError(
            "config.data.source='shards' needs config.data.path (the --out directory of python -m mugv_data prepare)"
        )
    loader = ShardLoader(
        d.path,
        int(d.batch_size),
        text_len=int(d.text_len),
        seed=int(config.seed),
        process_index=shard[0],
        process_count=shard[1],
        num_workers=int(d.get("num_workers", 0)),
        truncate_text=bool(d.get("truncate_captions", False)),
        verify=bool(d.get("verify", False)),
        on_bad_shard=str(d.get("on_bad_shard", "refuse")),
        max_skipped=int(d.get("max_skipped_records", 100)),
    )
    if (loader.latent_channels, loader.text_dim) != (model_cfg.in_channels, model_cfg.text_dim):
        raise ValueError(
            f"dataset {d.path} has {loader.latent_channels} latent channels and text width "
            f"{loader.text_dim}; model {config.model} expects {model_cfg.in_channels} and "
            f"{model_cfg.text_dim} (set config.model_overrides.text_dim)"
        )
    return loader


def _image_video_iterator(config, model_cfg: DiTConfig, shard: tuple[int, int]):
    """MixedLoader over [images, video]: the image child is the data config with the image buckets
    (synthetic) or image dataset (shards); weights follow `image_fraction(step)`."""
    mix = config.data.mix
    for name in ("image_fraction_start", "image_fraction_end"):
        if not 0.0 <= float(mix[name]) <= 1.0:
            raise ValueError(f"config.data.mix.{name} must be in [0, 1], got {mix[name]}")
    video_cfg = config.copy_and_resolve_references()
    video_cfg.data.mix.image_fraction_start = video_cfg.data.mix.image_fraction_end = 0.0
    image_cfg = video_cfg.copy_and_resolve_references()
    if config.data.source == "shards":
        if not mix.image_path:
            raise ValueError("config.data.mix.image_path must name the prepared image dataset")
        image_cfg.data.path = mix.image_path
    else:
        if not mix.image_buckets:
            raise ValueError("config.data.mix.image_buckets must list (1, h, w, batch) image buckets")
        bad = [b for b in mix.image_buckets if int(b[0]) != 1]
        if bad:
            raise ValueError(f"config.data.mix.image_buckets must have 1 latent frame, got {bad}")
        image_cfg.data.buckets = tuple(tuple(b) for b in mix.image_buckets)
    start, end, steps = float(mix.image_fraction_start), float(mix.image_fraction_end), int(mix.anneal_steps)

    def weights(step):
        f = image_fraction(step, start, end, steps)
        return (f, 1.0 - f)

    return MixedLoader(
        [build_iterator(image_cfg, model_cfg, shard), build_iterator(video_cfg, model_cfg, shard)],
        weights,
        seed=int(config.seed),
    )
