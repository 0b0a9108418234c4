"""`config.megatron.micro_batch_size`: the Megatron trainer's accumulation follows its own
micro-batch (global batch / (DP × micro)), not the JAX layout's optim.grad_accum_steps, and a
split that does not divide is refused at start naming the keys."""

import dataclasses

import pytest
import torch

from mugv.config import get_config
from mugv.data.synthetic import Bucket, DataIterator, SyntheticTextToLatent
from mugv.training import ObjectiveConfig, OptimConfig

CFG = get_config("tiny")
OBJECTIVE = ObjectiveConfig(i2v_prob=0.5, caption_dropout_prob=0.25)


def _step(optim, micro_batch_size):
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train.step import Trainer

    parallel.setup(1)
    tr = Trainer(CFG, optim, OBJECTIVE, seed=0, use_megatron_optimizer=False, micro_batch_size=micro_batch_size)
    calls = []
    real = tr.forward_loss
    tr.forward_loss = lambda inputs, target: calls.append(target.shape[0]) or real(inputs, target)
    batch = next(
        DataIterator(SyntheticTextToLatent([Bucket(2, 4, 6, 8)], in_channels=CFG.in_channels, text_dim=CFG.text_dim))
    )
    batch.pop("prompt_id")
    tr.train_step(batch)
    return calls, {n: p.detach().clone() for n, p in tr.module.named_parameters()}


def test_micro_batch_size_sets_the_accumulation():
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, grad_accum_steps=1)
    calls, weights = _step(optim, micro_batch_size=2)
    assert calls == [2, 2, 2, 2]  # 8 samples, one rank: 4 micro-batches of 2, whatever grad_accum_steps says
    ref_calls, ref = _step(dataclasses.replace(optim, grad_accum_steps=4), micro_batch_size=None)
    assert ref_calls == calls
    for name, w in weights.items():
        assert torch.equal(w, ref[name]), name


def test_a_split_that_does_not_divide_is_refused_naming_the_keys(tmp_path):
    from configs.tiny import get_config as tiny_config
    from mugv_megatron.train import backend as train

    config = tiny_config()
    config.data.buckets = ((2, 4, 4, 8),)
    config.megatron.micro_batch_size = 3
    with pytest.raises(ValueError, match=r"8 samples per data-parallel rank .* config.megatron.micro_batch_size=3"):
        train.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
