"""T5TextEncoder: the T5-XXL loading path, run on a tiny random T5 encoder + Unigram tokenizer that
this test builds and saves (the real model cannot be downloaded here)."""

import dataclasses

import numpy as np
import pytest
import torch

from mugv.config import PRESETS
from mugv_data import text
from tests.doc_commands import doc_command
from tests.stand_ins import tiny_t5_config


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5EncoderModel, T5TokenizerFast

    path = str(tmp_path_factory.mktemp("t5"))
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # The T5 ids: pad 0, EOS 1, unk 2.
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(
        [
            "a red square moving left",
            "a blue circle moving up",
            "a green triangle moving down",
            "ugly, blurry, lowres, bad anatomy",
        ]
        * 5,
        trainer,
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    ).save_pretrained(path)
    torch.manual_seed(0)
    T5EncoderModel(tiny_t5_config(d_model=32)).save_pretrained(path)
    return path


def test_t5_encoder_features_masks_and_dit_width(t5_dir):
    enc = text.get_encoder(f"t5:{t5_dir}", max_length=24)
    assert isinstance(enc, text.T5TextEncoder) and enc.dim == 32 and enc.max_length == 24
    caps = ["a red square moving left", "a blue circle moving up", ""]
    feats, mask = enc.encode(caps)
    assert feats.shape == (3, 24, 32) and feats.dtype == np.float32 and mask.dtype == np.int32
    ids = [enc.tokenizer(c)["input_ids"] for c in caps]
    assert all(i[-1] == 1 for i in ids)  # EOS appended, as the release tokenises
    assert mask.sum(1).tolist() == [len(i) for i in ids] and mask.sum(1)[2] == 1
    assert np.all(np.diff(mask, axis=1) <= 0) and not np.any(feats[mask == 0])
    assert np.abs(feats[0, :3] - feats[1, :3]).max() > 1e-3
    # The attention mask is passed to T5: valid rows do not depend on how much padding follows.
    longer, _ = text.T5TextEncoder(t5_dir, max_length=40).encode(caps)
    np.testing.assert_allclose(longer[:, :24], feats, rtol=0, atol=1e-5)
    # The same numbers as calling the model directly on unpadded ids (float32).
    with torch.no_grad():
        direct = enc.model(input_ids=torch.tensor([ids[0]])).last_hidden_state.numpy()[0]
    np.testing.assert_allclose(feats[0, : len(ids[0])], direct, rtol=0, atol=1e-5)
    # The DiT's caption width and token count follow the encoder.
    over = text.dit_overrides(enc)
    assert over == {"text_dim": 32, "max_text_tokens": 24}
    assert dataclasses.replace(PRESETS["tiny"], **over).text_dim == 32


def test_t5_null_and_negative_features(t5_dir):
    enc = text.T5TextEncoder(t5_dir, max_length=16)
    null_y, null_m = text.null_features(enc)
    assert null_y.shape == (16, 32) and null_m.tolist() == [1] + [0] * 15  # EOS only
    neg_y, neg_m = text.negative_features(enc)  # the release's tag list, truncated to 16 tokens
    assert neg_m.sum() == 16 and not np.array_equal(neg_y, null_y)
    assert text.NEGATIVE_PROMPT.startswith("ugly, blurry, lowres") and text.NEGATIVE_PROMPT.endswith("username, blurry")
    assert text.with_aesthetic_suffix("a cat", 6.0) == "a cat aesthetic score: 6.0."
    assert text.with_aesthetic_suffix("a cat", 4.46) == "a cat aesthetic score: 4.5."
    assert text.with_aesthetic_suffix("a cat", None) == "a cat"


def test_t5_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        text.T5TextEncoder(str(tmp_path / "nope"))


# --- a real T5 directory and the prompt command (issue 25 items 2 and 3) ---------------------


@pytest.fixture(scope="module")
def hub_t5(tmp_path_factory):
    from tests.stand_ins import hub_t5_dir

    return hub_t5_dir(str(tmp_path_factory.mktemp("t5_hub") / "t5-v1_1-xxl"))


def test_hub_layout_t5_directory_loads(hub_t5):
    """The hub's t5-v1_1-xxl has `spiece.model` and no `tokenizer.json`: its tokenizer needs
    sentencepiece, which pyproject.toml must therefore install (without it transformers stops with
    'tiktoken is required…')."""
    import os
    import tomllib

    assert "spiece.model" in os.listdir(hub_t5) and "tokenizer.json" not in os.listdir(hub_t5)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    # In the data tools' extra (prepare's encoders); newer releases clash with the pinned protobuf.
    assert "sentencepiece>=0.2.0,<0.2.1" in project["optional-dependencies"]["data"]
    enc = text.get_encoder(f"t5:{hub_t5}", max_length=12)
    feats, mask = enc.encode(["a red square moving left", ""])
    ids = enc.tokenizer("a red square moving left")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids  # EOS appended, every word known to the trained pieces
    assert feats.shape == (2, 12, 32) and mask.sum(1).tolist() == [min(len(ids), 12), 1]
    assert not np.any(feats[mask == 0]) and np.all(np.isfinite(feats))


def test_prompt_command_writes_the_samplers_text_file(hub_t5, tmp_path, capsys):
    """`python -m mugv_data text` encodes a prompt (and the negative prompt) with prepare's encoder
    into the file `python -m mugv_jax.sample --text` reads."""
    from mugv.io import text_features
    from mugv_data.__main__ import main

    out = str(tmp_path / "prompt" / "features.safetensors")
    args = ["text", f"--text-encoder=t5:{hub_t5}", "--text-len=16", "--prompt=a blue circle moving up"]
    main([*args, "--aes-suffix=6.0", "--negative", f"--out={out}"])
    assert f"wrote {out}: y [1, 1, 16, 32]" in capsys.readouterr().out
    got = text_features.read(out)
    enc = text.T5TextEncoder(hub_t5, max_length=16)
    want_y, want_mask = enc.encode(["a blue circle moving up aesthetic score: 6.0."])
    neg_y, neg_mask = text.negative_features(enc)
    assert got["y"].shape == (1, 1, 16, 32) and got["mask"].dtype == np.int32
    np.testing.assert_array_equal(got["y"][0, 0], want_y[0])
    np.testing.assert_array_equal(got["mask"][0], want_mask[0])
    np.testing.assert_array_equal(got["neg_y"][0, 0], neg_y)
    np.testing.assert_array_equal(got["neg_mask"][0], neg_mask)
    # Without --negative: only the prompt (the sampler then guides against the null caption).
    # docs/data.md's command, with prepare's encoder.
    plain = {"features.safetensors": str(tmp_path / "plain.safetensors")}
    main([*doc_command("docs/data.md", "python -m mugv_data text", plain)[3:], *args[1:3]])
    assert sorted(text_features.read(str(tmp_path / "plain.safetensors"))) == ["mask", "y"]
    with pytest.raises(SystemExit, match="a prompt has no measured score"):
        main([*args, "--aes-suffix=score", f"--out={tmp_path / 'x.safetensors'}"])
