"""Tiny stand-ins for what a user brings, written the way the real ones are laid out (nothing can
be downloaded here): a T5 encoder directory in the hub layout of t5-v1_1-xxl (`spiece.model`,
no `tokenizer.json`)."""

from __future__ import annotations

import json
import os

T5_SENTENCES = [
    "a red square moving left",
    "a blue circle moving up",
    "a green triangle moving down",
    "cyclists riding bicycles along a street",
    "ugly, blurry, lowres, bad anatomy",
]


def tiny_t5_config(d_model: int):
    """The T5 v1.1 structure (gated-GELU, relative position buckets) at toy size."""
    from transformers import T5Config

    return T5Config(
        vocab_size=64,
        d_model=d_model,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        layer_norm_epsilon=1e-6,
    )


def hub_t5_dir(path: str, *, d_model: int = 32, seed: int = 0) -> str:
    """A T5 v1.1 encoder at toy size in the layout of the hub's t5-v1_1-xxl: config.json, the
    weights, a SentencePiece `spiece.model` (trained here on a few sentences), the special tokens
    map and tokenizer_config.json naming T5Tokenizer; no tokenizers-library `tokenizer.json`."""
    import sentencepiece as spm
    import torch
    from transformers import T5EncoderModel

    os.makedirs(path, exist_ok=True)
    corpus = os.path.join(path, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(T5_SENTENCES * 4))
    # T5's ids: pad 0, EOS 1, unk 2, no BOS.
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(path, "spiece"),
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    for leftover in (corpus, os.path.join(path, "spiece.vocab")):
        os.remove(leftover)
    torch.manual_seed(seed)
    T5EncoderModel(tiny_t5_config(d_model)).save_pretrained(path)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "extra_ids": 0, "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}, f)
    return path


def release_vae_pt(path: str, preset: str = "tiny", seed: int = 0) -> str:
    """A random VAE of `preset` as the release ships its VAE: a flat {name: tensor} torch file
    (`vae.pt`), the state dict our exporter gives (mugv_jax.vae.export_release_state_dict)."""
    import torch

    import mugv_jax.vae as vae
    from mugv.io.atomic import atomic_output
    from mugv_jax.vae.checkpoint import random_vae

    state = {k: torch.from_numpy(v) for k, v in vae.export_release_state_dict(random_vae(preset, seed=seed)).items()}
    with atomic_output(path, make_parent=True) as tmp:
        torch.save(state, tmp)
    return path


def release_dit_pt(path: str, config, seed: int = 0) -> str:
    """A random DiT of `config` as a release-layout `dit.pt`, written by the converters' release
    writer (mugv.io.release.ReleaseWriter): norm weights 1, biases 0, other tensors N(0, 0.02)."""
    import numpy as np

    from mugv.io.atomic import atomic_output
    from mugv.io.base import Entry
    from mugv.io.release import ReleaseWriter
    from mugv.schema import release_schema

    rng = np.random.default_rng(seed)
    shapes = release_schema(config)
    entries = {n: Entry(tuple(s), np.dtype(np.float32)) for n, s in shapes.items()}
    with atomic_output(path, make_parent=True) as tmp:
        writer = ReleaseWriter(path, tmp, config, entries)
        for name, shape in shapes.items():
            if "norm" in name and name.endswith("weight"):
                value = np.ones(shape, np.float32)
            elif name.endswith("bias"):
                value = np.zeros(shape, np.float32)
            else:
                value = (0.02 * rng.standard_normal(shape)).astype(np.float32)
            writer.write(name, value)
        writer.check_complete()
        writer.finish()
    return path
