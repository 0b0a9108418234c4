"""config.freeze on the Megatron trainer: the named release modules keep their values (no
gradients, no optimizer state, in the checkpoint too), the EMA still covers them, and a resume
with other frozen modules is refused. Tiny model, one process."""

import pytest
import torch

from mugv.config import get_config
from mugv.data.synthetic import DataIterator
from mugv.io.mismatch import IncompatibleCheckpoint
from mugv.layouts import megatron as layout
from mugv.lora import FreezeConfig
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_megatron.train import checkpointing
from tests.mugv_megatron import helpers
from tests.mugv_megatron.test_megatron_trainer import source

CFG = get_config("tiny")
OPTIM = OptimConfig(learning_rate=2e-3, warmup_steps=0, ema_decay=0.9)
FREEZE = FreezeConfig(("y_embedder", "t_embedder"))


def _trainer(freeze=FREEZE):
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train.step import Trainer

    parallel.setup(1)
    return Trainer(CFG, OPTIM, ObjectiveConfig(), use_megatron_optimizer=False, freeze=freeze)


def _module(name: str) -> str:
    return layout.release_name(name).split(".", 1)[0]


def test_frozen_modules_keep_their_values_and_have_no_optimizer_state(tmp_path):
    tr = _trainer()
    before = {n: p.detach().clone() for n, p in tr.module.named_parameters()}
    frozen = {n for n in before if _module(n) in FREEZE.modules}
    assert frozen and {n for n, p in tr.module.named_parameters() if not p.requires_grad} == frozen
    helpers.run(tr, DataIterator(source()), 2)
    after = dict(tr.module.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in set(before) - frozen if "norm" not in n)
    assert all(tr.optimizer.opt.state.get(after[n]) in (None, {}) for n in frozen)
    assert frozen <= set(tr.ema.shadow)  # the EMA covers them, at their fixed values
    ckdir = str(tmp_path / "checkpoints")
    run_config = {"freeze": {"modules": list(FREEZE.modules)}, "lora": {"rank": 0}}
    checkpointing.save(ckdir, tr, {"position": 2}, run_config)
    from mugv.io.torch_dist import TorchDistReader

    with TorchDistReader(ckdir) as r:
        keys = set(r._tensors)
    assert "optimizer.state.exp_avg.x_embedder.proj.weight" in keys
    assert not keys & {f"optimizer.state.{m}.{n}" for n in frozen for m in ("exp_avg", "exp_avg_sq")}
    again = _trainer()
    assert checkpointing.restore_latest(ckdir, again)["data"] == {"position": 2}
    assert all(torch.equal(p, after[n]) for n, p in again.module.named_parameters())
    with pytest.raises(IncompatibleCheckpoint, match="y_embedder"):
        checkpointing.restore_latest(ckdir, _trainer(FreezeConfig()))
    assert checkpointing.steps(ckdir) == [2]  # nothing moved aside


def test_lora_and_freeze_are_refused_where_the_trainer_cannot_run_them_naming_the_flags():
    from mugv.run.config import as_run_config
    from mugv_megatron.train.backend import refused_fields

    lora = {"lora": {"rank": 4}}
    assert refused_fields(as_run_config(lora)) == []
    for extra, flag in [
        ({"megatron": {"pp": 2}}, "--config.megatron.pp=1"),
        ({"megatron": {"cp": 2}}, "--config.megatron.cp=1"),
        ({"mode": "preference"}, "config.mode='preference'"),
    ]:
        for tuned in (lora, {"freeze": {"modules": ["y_embedder"]}}):
            (msg,) = refused_fields(as_run_config({**tuned, **extra}))
            assert flag in msg and ("config.lora.rank" in msg), msg
    (msg,) = refused_fields(as_run_config({"lora": {"rank": 4, "base_dtype": "bfloat16"}}))
    assert "config.lora.base_dtype='bfloat16'" in msg and "--config.megatron.params_dtype" in msg, msg
