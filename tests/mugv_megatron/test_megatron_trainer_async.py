"""Async torch_dist saves of the Megatron trainer keep the atomic-publish guarantee.

An async save writes `iter_XXXXXXX.tmp` from a forked writer while training goes on; only its
finalize (all ranks' writers done) renames it and updates the tracker. So: before the finalize,
restore still picks the previous checkpoint; the published checkpoint holds the state at the
save, not the weights trained meanwhile; a process killed before the finalize leaves the
previous checkpoint loadable and nothing that looks complete.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from mugv.config import get_config
from mugv.io.megatron import TRACKER
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_megatron.train import checkpointing
from tests.mugv_megatron import helpers

ROOT = Path(__file__).resolve().parents[2]

CFG = get_config("tiny")
OPTIM = OptimConfig(learning_rate=2e-3, warmup_steps=0, weight_decay=0.01, ema_decay=0.9)
OBJECTIVE = ObjectiveConfig(i2v_prob=0.5, i2v_mode="quarter", caption_dropout_prob=0.25)


def iterator():
    from mugv.data.synthetic import Bucket, DataIterator, SyntheticTextToLatent

    return DataIterator(SyntheticTextToLatent([Bucket(3, 4, 6, 2)], in_channels=CFG.in_channels, text_dim=CFG.text_dim))


def make_trainer(seed=0):
    return helpers.make_trainer(CFG, OPTIM, OBJECTIVE, seed)


run = helpers.run


def state(trainer) -> dict:
    return helpers.full_state(trainer, null_text=False)


def tracker(directory) -> str:
    return open(os.path.join(directory, TRACKER)).read()


def test_async_save_is_published_by_its_finalize_with_the_state_at_the_save(tmp_path):
    ckdir = str(tmp_path / "ck")
    tr, it = make_trainer(), iterator()
    run(tr, it, 2)
    checkpointing.save(ckdir, tr, it.get_state())
    os.makedirs(os.path.join(ckdir, "iter_0000009.tmp"))  # left by an earlier killed run
    run(tr, it, 1)
    at_save = state(tr)
    checkpointing.save(ckdir, tr, it.get_state(), async_save=True)
    assert checkpointing.pending_saves() == 1
    assert not os.path.exists(os.path.join(ckdir, "iter_0000009.tmp"))
    assert checkpointing.steps(ckdir) == [2] and tracker(ckdir) == "2"
    assert os.path.isdir(checkpointing.iter_dir(ckdir, 3) + ".tmp")
    run(tr, it, 1)  # weights change in place meanwhile
    before = make_trainer(seed=5)
    assert checkpointing.restore_latest(ckdir, before) is not None and before.step == 2

    assert checkpointing.finalize_async(blocking=True) == 1
    assert checkpointing.pending_saves() == 0
    assert checkpointing.steps(ckdir) == [2, 3] and tracker(ckdir) == "3"
    assert not [n for n in os.listdir(ckdir) if n.endswith(".tmp")]
    after = make_trainer(seed=6)
    checkpointing.restore_latest(ckdir, after)
    assert after.step == 3
    got = state(after)
    for k, v in at_save.items():
        assert torch.equal(got[k], v), k
    assert not torch.equal(got["param.start_token"], tr.module.start_token.detach())


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.mugv_megatron.test_megatron_trainer_async import iterator, make_trainer, run
    from mugv_megatron.train import checkpointing

    if __name__ == "__main__":
        tr, it = make_trainer(), iterator()
        run(tr, it, 1)
        checkpointing.save({ckdir!r}, tr, it.get_state())
        run(tr, it, 1)
        checkpointing.save({ckdir!r}, tr, it.get_state(), async_save=True)
        print("scheduled", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_process_killed_before_finalize_leaves_previous_checkpoint(tmp_path):
    ckdir = str(tmp_path / "ck")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN.format(root=str(ROOT), ckdir=ckdir))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "killed.log"
    # Its own session: what the killed run leaves behind (the checkpoint writer it forked, the
    # multiprocessing manager its saves report through) is ended with it, and holds no pipe of ours.
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=str(ROOT),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    assert code == -signal.SIGKILL, text[-3000:]
    assert "scheduled" in text
    assert checkpointing.steps(ckdir) == [1] and tracker(ckdir) == "1"
    tr = make_trainer(seed=7)
    meta = checkpointing.restore_latest(ckdir, tr)
    assert meta is not None and tr.step == 1
