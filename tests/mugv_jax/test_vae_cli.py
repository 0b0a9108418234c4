"""`python -m mugv_jax.vae encode|decode` (issue 9, item 6): batch jobs skip bad videos and say so."""

import json
import os

import numpy as np
import pytest

import mugv_jax.vae as vae
from mugv.data.video import decode_video, write_mp4
from mugv_jax.vae.__main__ import EXIT_FATAL, EXIT_SKIPPED, main
from mugv_jax.vae.checkpoint import random_vae
from mugv_jax.vae.trainer import save_release
from tests.doc_commands import doc_command


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = random_vae("tiny", seed=0)
    path = str(tmp_path_factory.mktemp("w") / "tiny.safetensors")
    save_release(vae.export_release_state_dict(model), path)
    return path


def _moving_square(t=9, h=24, w=32):
    frames = np.full((t, h, w, 3), 40, np.uint8)
    for i in range(t):
        frames[i, 4:12, 2 + 2 * i : 10 + 2 * i] = (220, 60, 30)
    return frames


def test_batch_encode_skips_truncated_and_corrupt_then_decodes(tmp_path, weights, capsys):
    good = str(tmp_path / "good.mp4")
    write_mp4(good, _moving_square(), fps=8)
    data = open(good, "rb").read()
    truncated = str(tmp_path / "truncated.mp4")
    with open(truncated, "wb") as f:  # the moov index is written last: cut it off
        f.write(data[: len(data) // 2])
    garbage = str(tmp_path / "garbage.mp4")
    with open(garbage, "wb") as f:
        f.write(b"not a video at all" * 10)
    out = tmp_path / "latents"
    # docs/vae.md's commands on the tiny VAE, these videos and directories.
    tiny = {"vae.pt": weights, "--vae-config release": "--vae-config tiny"}
    encode = doc_command(
        "docs/vae.md",
        "python -m mugv_jax.vae encode",
        {**tiny, "latents/": str(out), "a.mp4 b.gif ...": f"{truncated} {good} {garbage}"},
    )
    code = main(encode[3:])
    err = capsys.readouterr().err
    assert code == EXIT_SKIPPED
    assert "2 of 3 inputs skipped" in err
    assert f"{truncated}: " in err and f"{garbage}: " in err and f"{good}:" not in err
    # Issue 25: progress inside a video (a bar per network call, by chunk) and the output path.
    assert "good: encode_frames" in err and "good: encode_groups" in err and "chunk" in err
    assert f"wrote {out / 'good.npy'}: latents [24, 2, 3, 4] from 9 frames of 24×32" in err
    z = np.load(out / "good.npy")
    assert z.shape == (24, 2, 3, 4)  # T'=⌈9/8⌉... chunked: 7 copies of frame 0 + 9 → 16 frames
    meta = json.load(open(out / "good.json"))
    assert meta["num_frames"] == 9 and (meta["height"], meta["width"]) == (24, 32)
    assert sorted(os.listdir(out)) == ["good.json", "good.npy"]

    videos = tmp_path / "videos"
    decode = doc_command(
        "docs/vae.md",
        "python -m mugv_jax.vae decode",
        {**tiny, "videos/": str(videos), "latents/a.npy ...": str(out / "good.npy")},
    )
    assert main(decode[3:]) == 0
    err = capsys.readouterr().err
    assert "good: decode_window" in err and "good: decode_frames" in err
    assert f"wrote {videos / 'good.mp4'}: 9 frames of 24×32 at 8 fps" in err
    frames, fps = decode_video(str(videos / "good.mp4"))
    assert frames.shape == (9, 24, 32, 3) and fps == 8


def test_all_inputs_bad_is_fatal(tmp_path, weights, capsys):
    bad = str(tmp_path / "x.gif")
    open(bad, "wb").write(b"GIF89a broken")
    code = main(["encode", "--weights", weights, "--vae-config", "tiny", "--out", str(tmp_path / "o"), bad])
    assert code == EXIT_FATAL
    assert "1 of 1 inputs skipped" in capsys.readouterr().err
