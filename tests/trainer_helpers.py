"""Small builders shared by the trainer tests."""

import contextlib

import jax
import numpy as np

from mugv.config import get_config
from mugv.data.synthetic import Bucket, SyntheticTextToLatent
from mugv.training import ObjectiveConfig, OptimConfig
from mugv_jax.dit.model import RuntimeOptions
from mugv_jax.parallel import mesh as mesh_lib
from mugv_jax.train import step as tr

AXES = ("data", "fsdp", "tensor", "context")
TINY = get_config("tiny")


def make_mesh(shape):
    n = int(np.prod(shape))
    return mesh_lib.build_mesh(dict(zip(AXES, shape)), devices=jax.devices()[:n])


def make_trainer(shape=(1, 1, 1, 1), optim=None, objective=None, config=TINY):
    return tr.Trainer(
        config,
        RuntimeOptions(),
        optim or OptimConfig(learning_rate=1e-3, warmup_steps=0),
        objective or ObjectiveConfig(i2v_prob=0.5, caption_dropout_prob=0.25),
        make_mesh(shape),
    )


def make_source(batch=8, buckets=None):
    return SyntheticTextToLatent(
        buckets or [Bucket(3, 4, 6, batch)], in_channels=TINY.in_channels, text_dim=TINY.text_dim
    )


def host_batch(source, index=0):
    b = source.batch(index)
    b.pop("prompt_id")
    return b


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@contextlib.contextmanager
def no_implicit_transfers():
    """big_vision's habit: inside, an implicit host↔device transfer (a numpy array or Python scalar
    handed to a jitted function, `float()` of a device array) raises; jax.device_put / device_get
    state the intended ones."""
    with jax.transfer_guard("disallow"):
        yield


def guard_train_steps(monkeypatch, trainer_class=tr.Trainer):
    """Run every `trainer_class.train_step` of the test (the DiT Trainer's by default; the VAE's
    has its own) under `no_implicit_transfers`, so a step that silently moves data between host
    and devices fails the test."""
    step = trainer_class.train_step

    def guarded(self, *args, **kwargs):
        with no_implicit_transfers():
            return step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "train_step", guarded)
