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

import dataclasses

from mugv.config import DiTConfig
from mugv.data import synthetic
from mugv.data.loader import MixedLoader, ShardLoader
from mugv.run.config import MixConfig, RunConfig, as_run_config


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
    run = as_run_config(config)
    d = run.data
    return synthetic.SyntheticTextToLatent(
        [synthetic.Bucket(*b) for b in d.buckets],
        in_channels=model_cfg.in_channels,
        text_dim=model_cfg.text_dim,
        text_len=d.text_len,
        num_prompts=d.num_prompts,
        fps=d.fps,
        seed=run.seed,
    )


def image_fraction(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Linear anneal of the image share from `start` to `end` over `anneal_steps`, then constant."""
    if anneal_steps <= 0:
        return float(end)
    return float(start + (end - start) * min(max(step, 0), anneal_steps) / anneal_steps)


def mixing_images(config) -> bool:
    return as_run_config(config).data.mix.on


def build_iterator(config, model_cfg: DiTConfig, shard: tuple[int, int] = (0, 1)):
    """This shard's batch iterator for `config.data` (see the module docstring)."""
    run = as_run_config(config)
    d = run.data
    if d.mix.on:
        return _image_video_iterator(run, model_cfg, shard)
    if d.source == "synthetic":
        return ShardSlice(synthetic.DataIterator(synthetic_source(run, model_cfg)), shard)
    if not d.path:
        raise ValueError(
            "--config.data.source='shards' needs --config.data.path (the --out of python -m mugv_data prepare)"
        )
    loader = ShardLoader(
        d.path,
        d.batch_size,
        text_len=d.text_len,
        seed=run.seed,
        process_index=shard[0],
        process_count=shard[1],
        num_workers=d.num_workers,
        truncate_text=d.truncate_captions,
        verify=d.verify,
        on_bad_shard=d.on_bad_shard,
        max_skipped=d.max_skipped_records,
    )
    if (loader.latent_channels, loader.text_dim) != (model_cfg.in_channels, model_cfg.text_dim):
        raise ValueError(
            f"dataset {d.path} has {loader.latent_channels} latent channels and text width "
            f"{loader.text_dim}; model {run.model} expects {model_cfg.in_channels} and "
            f"{model_cfg.text_dim} (set --config.model_overrides.text_dim)"
        )
    return loader


def _image_video_iterator(run: RunConfig, model_cfg: DiTConfig, shard: tuple[int, int]):
    """MixedLoader over [images, video]: the image child is the data config with the image buckets
    (synthetic) or image dataset (shards); weights follow `image_fraction(step)`."""
    mix = run.data.mix
    video = dataclasses.replace(run.data, mix=MixConfig())
    if video.source == "shards":
        if not mix.image_path:
            raise ValueError("--config.data.mix.image_path must name the prepared image dataset")
        image = dataclasses.replace(video, path=mix.image_path)
    else:
        if not mix.image_buckets:
            raise ValueError("--config.data.mix.image_buckets must list (1, h, w, batch) image buckets")
        image = dataclasses.replace(video, buckets=mix.image_buckets)
    start, end, steps = mix.image_fraction_start, mix.image_fraction_end, mix.anneal_steps

    def weights(step):
        f = image_fraction(step, start, end, steps)
        return (f, 1.0 - f)

    return MixedLoader(
        [
            build_iterator(run.replace(data=image), model_cfg, shard),
            build_iterator(run.replace(data=video), model_cfg, shard),
        ],
        weights,
        seed=run.seed,
    )
