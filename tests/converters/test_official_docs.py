"""The command blocks of docs/converters.md's "The official trainer's files" and "The VAE",
run as written on the golden official checkpoints, a Megatron trainer checkpoint and a VAE run
(the paths substituted)."""

import os
import re
import shlex
import shutil

import numpy as np
import torch

from converters import cli
from mugv.io import null_text as null_lib
from tests.converters.test_vae_convert import finish, vae_run

DOC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "converters.md"
)
OFFICIAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "official")


def commands(block: str) -> list[list[str]]:
    """The commands of the ```sh block after `<!-- commands: block -->` in docs/converters.md."""
    text = open(DOC).read()
    body = re.search(rf"<!-- commands: {block} -->\n```sh\n(.*?)```", text, re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
    return [shlex.split(ln) for ln in lines]


def run(cmds, paths: dict[str, str]) -> None:
    for argv in cmds:
        assert argv[:3] == ["python", "-m", "converters"], argv
        args = [a for a in argv[3:]]
        for placeholder, real in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            args = [a.replace(placeholder, real) for a in args]
        assert cli.main(args + (["--quiet"] if args[0] == "convert" else [])) == 0, args


def test_the_official_trainer_commands_run(tmp_path):
    from mugv.config import get_config
    from mugv.training import ObjectiveConfig, OptimConfig
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train import checkpointing
    from mugv_megatron.train.step import Trainer

    official = tmp_path / "official"
    shutil.copytree(os.path.join(OFFICIAL, "torch_dist_te"), official)
    parallel.setup(1)
    tr = Trainer(get_config("tiny"), OptimConfig(), ObjectiveConfig(), seed=1, use_megatron_optimizer=False)
    checkpointing.save(str(tmp_path / "m" / "checkpoints"), tr, {"position": 0})
    os.makedirs(tmp_path / "ckpt")
    run(
        commands("official"),
        {"/official": str(official), "/ckpt": str(tmp_path / "ckpt"), "/runs/m": str(tmp_path / "m")},
    )
    # The official null caption went with the weights; the outputs exist where the block says.
    assert os.path.isfile(null_lib.sidecar_path(str(tmp_path / "ckpt" / "dit_ema.safetensors")))
    assert os.path.isdir(official / "from_mugv" / "iter_0000001") and os.path.isdir(official / "tp2" / "iter_0000001")


def test_the_vae_commands_run(tmp_path):
    workdir, trainer, shift, scale = vae_run(tmp_path / "runs")
    finish(workdir, shift, scale)
    trainer.export(os.path.join(workdir, "vae.safetensors"), shift, scale)
    os.makedirs(tmp_path / "ckpt")
    run(commands("vae"), {"/runs/vae": workdir, "/ckpt": str(tmp_path / "ckpt")})
    from safetensors.numpy import load_file

    back = load_file(str(tmp_path / "ckpt" / "vae.safetensors"))
    assert np.array_equal(back["shift"].reshape(-1), shift)
    exported, want = (
        torch.load(tmp_path / "ckpt" / "vae_export.pt", weights_only=True),
        load_file(os.path.join(workdir, "vae.safetensors")),
    )
    assert set(exported) == set(want) and all(np.array_equal(exported[k].numpy(), want[k]) for k in want)
