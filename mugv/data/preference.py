"""Preference data, framework-free: label JSONL files, clip stores and the batch iterator both
backends' preference runs read (docs/training_recipe.md has the format).

Label data: JSONL, one record per line, either a pair
  {"source": "motion", "prompt": "...", "winner": "clip_a", "loser": "clip_b"}
or an absolute label
  {"source": "physics", "prompt": "...", "clip": "clip_c", "label": "good" | "bad"}
with clips in a directory as <clip id>.safetensors holding latents [C, F, H, W], y [L, D],
mask [L] and fps [] (the caption's text features travel with the clip). Batches from different
annotation sources are interleaved round-robin.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from mugv.io.atomic import write_text
from mugv.safetensors_io import save_atomic


def batch_kind(batch: dict) -> str:
    if "latents_w" in batch and "latents_l" in batch:
        return "dpo"
    if "latents" in batch and "label" in batch:
        return "kto"
    raise ValueError(
        f"a preference batch needs latents_w/latents_l (pairs) or latents/label (KTO); got keys {sorted(batch)}"
    )


def read_labels(path: str) -> list[dict]:
    """Records of a label JSONL file, checked; errors name the file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(r, dict) or not isinstance(r.get("source"), str):
                raise ValueError(f"{path}:{n}: every record needs a string 'source'")
            if "winner" in r or "loser" in r:
                if not (isinstance(r.get("winner"), str) and isinstance(r.get("loser"), str)):
                    raise ValueError(f"{path}:{n}: a pair needs string 'winner' and 'loser' clip ids")
                r["kind"] = "dpo"
            elif "clip" in r:
                if r.get("label") not in ("good", "bad"):
                    raise ValueError(f"{path}:{n}: 'label' must be 'good' or 'bad', got {r.get('label')!r}")
                r["kind"] = "kto"
            else:
                raise ValueError(f"{path}:{n}: a record is a pair (winner, loser) or a label (clip, label)")
            out.append(r)
    if not out:
        raise ValueError(f"{path}: no label records")
    return out


class ClipStore:
    """Clips as <dir>/<clip id>.safetensors (latents, y, mask, fps); cached after the first read."""

    def __init__(self, directory: str):
        self.directory = directory
        self._cache: dict = {}

    def get(self, clip_id: str) -> dict:
        if clip_id not in self._cache:
            from safetensors.numpy import load_file

            path = os.path.join(self.directory, f"{clip_id}.safetensors")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"clip {clip_id!r}: no {path}")
            d = load_file(path)
            missing = {"latents", "y", "mask", "fps"} - set(d)
            if missing:
                raise ValueError(f"{path}: missing {sorted(missing)}")
            self._cache[clip_id] = d
        return self._cache[clip_id]


def write_clip(directory: str, clip_id: str, latents, y, mask, fps) -> None:
    save_atomic(
        {
            "latents": np.asarray(latents, np.float32),
            "y": np.asarray(y, np.float32),
            "mask": np.asarray(mask, np.int32),
            "fps": np.asarray(fps, np.float32),
        },
        os.path.join(directory, f"{clip_id}.safetensors"),
    )


class PreferenceIterator:
    """Batches of `batch_size` records from one annotation source at a time, sources interleaved
    round-robin (sorted by name); within a source a fresh permutation per epoch from (seed, source,
    epoch). Step i's batch is a pure function of i, so the state is just the step."""

    def __init__(self, records: Sequence[dict], store, batch_size: int, seed: int = 0):
        self.store, self.batch_size, self.seed, self.step = store, int(batch_size), int(seed), 0
        self.sources: dict[str, list[dict]] = {}
        for r in records:
            self.sources.setdefault(r["source"], []).append(r)
        self.names = sorted(self.sources)
        for name, rs in self.sources.items():
            kinds = {r["kind"] for r in rs}
            if len(kinds) != 1:
                raise ValueError(f"annotation source {name!r} mixes pairs and labels; give each its own source")
            if len(rs) < self.batch_size:
                raise ValueError(
                    f"annotation source {name!r} has {len(rs)} records, fewer than the batch size {self.batch_size}"
                )

    def __iter__(self):
        return self

    def batch(self, step: int) -> dict:
        si = step % len(self.names)
        name = self.names[si]
        rs = self.sources[name]
        per_epoch = len(rs) // self.batch_size
        visit = step // len(self.names)
        epoch, j = divmod(visit, per_epoch)
        order = np.random.default_rng([self.seed, si, epoch]).permutation(len(rs))
        chosen = [rs[k] for k in order[j * self.batch_size : (j + 1) * self.batch_size]]
        return self._collate(chosen, name)

    def _collate(self, rs, name) -> dict:
        def stack(key, ids):
            arrs = [self.store.get(i)[key] for i in ids]
            shapes = {a.shape for a in arrs}
            if len(shapes) != 1:
                raise ValueError(
                    f"annotation source {name!r}: clips {ids} have different {key} shapes "
                    f"{sorted(shapes)}; put one shape per source"
                )
            return np.stack(arrs)

        if rs[0]["kind"] == "dpo":
            w, l = [r["winner"] for r in rs], [r["loser"] for r in rs]
            return {
                "latents_w": stack("latents", w).astype(np.float32),
                "latents_l": stack("latents", l).astype(np.float32),
                "y": stack("y", w)[:, None].astype(np.float32),
                "mask": stack("mask", w).astype(np.int32),
                "fps": stack("fps", w).reshape(-1).astype(np.float32),
            }
        ids = [r["clip"] for r in rs]
        return {
            "latents": stack("latents", ids).astype(np.float32),
            "y": stack("y", ids)[:, None].astype(np.float32),
            "mask": stack("mask", ids).astype(np.int32),
            "fps": stack("fps", ids).reshape(-1).astype(np.float32),
            "label": np.array([r["label"] == "good" for r in rs], np.float32),
        }

    def __next__(self) -> dict:
        b = self.batch(self.step)
        self.step += 1
        return b

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def write_synthetic(
    directory: str,
    *,
    latent_shape=(2, 4, 4),
    in_channels=24,
    text_dim=64,
    text_len=8,
    num_prompts=8,
    pairs_per_prompt=2,
    seed=0,
    artifact=0.7,
    labels: bool = True,
) -> str:
    """A labelled toy set in the documented format: winners/good clips are the caption's smooth
    pattern (SyntheticTextToLatent), losers/bad ones carry a checkerboard artifact of random sign
    and amplitude. Pairs go to source "motion", good/bad labels of the same clips (unless
    `labels=False`) to "physics". Writes <dir>/labels.jsonl and <dir>/clips/; returns its path."""
    from mugv.data.synthetic import Bucket, SyntheticTextToLatent

    src = SyntheticTextToLatent(
        [Bucket(*latent_shape, 1)],
        in_channels=in_channels,
        text_dim=text_dim,
        text_len=text_len,
        num_prompts=num_prompts,
        seed=seed,
    )
    patterns = src.patterns(src.buckets[0])
    f, h, w = latent_shape
    checker = ((np.indices((f, h, w)).sum(0) % 2) * 2 - 1).astype(np.float32)
    rng = np.random.default_rng([seed, 7])
    clips = os.path.join(directory, "clips")
    os.makedirs(clips, exist_ok=True)
    lines = []
    for p in range(num_prompts):
        for k in range(pairs_per_prompt):
            amp = artifact * (0.5 + rng.random()) * rng.choice([-1.0, 1.0])
            chan = rng.standard_normal((in_channels, 1, 1, 1)).astype(np.float32)
            good, bad = f"p{p}_good{k}", f"p{p}_bad{k}"
            write_clip(clips, good, patterns[p], src.text[p], src.text_mask[p], src.fps)
            write_clip(clips, bad, patterns[p] + amp * chan * checker, src.text[p], src.text_mask[p], src.fps)
            lines.append({"source": "motion", "prompt": f"prompt {p}", "winner": good, "loser": bad})
            if labels:
                lines.append({"source": "physics", "prompt": f"prompt {p}", "clip": good, "label": "good"})
                lines.append({"source": "physics", "prompt": f"prompt {p}", "clip": bad, "label": "bad"})
    return write_text(os.path.join(directory, "labels.jsonl"), "".join(json.dumps(r) + "\n" for r in lines))
