"""Release exports carry the trained null caption as a sidecar (mugv/io/null_text.py,
`Reader.null_text`): `convert` from a JAX or Megatron training checkpoint to release format
writes it, release → release copies it, a stale one is never left beside other weights, and the
sampler's default unconditional input finds it."""

import os

import numpy as np
import pytest

from converters import cli
from converters import training_state as ts
from mugv.io import null_text as null_lib
from tests.cross_backend.test_training_state import CFG, OBJECTIVE, OPTIM, SEED
from tests.helpers import DIT_WEIGHTS


@pytest.fixture(scope="module")
def training_checkpoints(tmp_path_factory):
    """A JAX training checkpoint (step 0 of the tiny golden weights) and its Megatron
    conversion, with the state's null caption."""
    from flax import nnx

    from mugv_jax import dit
    from mugv_jax.train.checkpointing import Checkpointer

    root = tmp_path_factory.mktemp("null_text_export")
    trainer = ts._jax_trainer({"optim": OPTIM, "objective": OBJECTIVE}, CFG)
    state = trainer.init_state(SEED, nnx.to_pure_dict(nnx.state(dit.load(DIT_WEIGHTS, CFG), nnx.Param)))
    jdir = str(root / "jax")
    ck = Checkpointer(jdir, use_async=False)
    ck.save(0, state, {"position": 0}, {"model": CFG.to_dict(), "optim": OPTIM, "objective": OBJECTIVE, "seed": SEED})
    ck.close()
    mdir = str(root / "megatron")
    ts.jax_to_megatron(jdir, mdir)
    null = np.asarray(state["null_text"])
    assert null.shape == (CFG.max_text_tokens, CFG.text_dim) and null.std() > 0
    return root, jdir, mdir, null


@pytest.mark.parametrize("fmt", ["jax", "megatron"])
def test_release_export_of_a_training_checkpoint_writes_its_null_caption(training_checkpoints, fmt, capsys):
    root, jdir, mdir, null = training_checkpoints
    out = str(root / f"from_{fmt}" / "dit_ema.safetensors")
    os.makedirs(os.path.dirname(out))
    src = f"jax:{jdir}" if fmt == "jax" else f"megatron:{mdir}"
    assert cli.main(["convert", "--src", src, "--dst", f"release:{out}", "--weights", "ema", "--quiet"]) == 0
    side = str(root / f"from_{fmt}" / "dit_ema.safetensors.null_text.safetensors")
    assert null_lib.sidecar_path(out) == side and f"wrote {side}" in capsys.readouterr().out
    np.testing.assert_array_equal(null_lib.load(side), null)  # bit for bit
    assert sorted(os.listdir(os.path.dirname(out))) == [
        "dit_ema.safetensors",
        "dit_ema.safetensors.null_text.safetensors",
    ]


def test_release_to_release_copies_the_sidecar_and_never_leaves_a_stale_one(training_checkpoints, tmp_path, capsys):
    root, jdir, _, null = training_checkpoints
    a = str(tmp_path / "a.safetensors")
    assert cli.main(["convert", "--src", f"jax:{jdir}", "--dst", f"release:{a}", "--quiet"]) == 0
    b = str(tmp_path / "b.pt")
    assert cli.main(["convert", "--src", a, "--dst", f"release:{b}", "--quiet"]) == 0
    np.testing.assert_array_equal(null_lib.load(str(tmp_path / "b.pt.null_text.safetensors")), null)
    capsys.readouterr()
    # Weights without a null caption replace b.pt: its old sidecar must go with it.
    assert cli.main(["convert", "--src", DIT_WEIGHTS, "--dst", f"release:{b}", "--quiet"]) == 2  # exists
    assert cli.main(["convert", "--src", DIT_WEIGHTS, "--dst", f"release:{b}", "--quiet", "--force"]) == 0
    assert "no null caption in the source" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "b.pt.null_text.safetensors")
    # A leftover sidecar next to a new output name is refused without --force (an older-named one
    # too: the new output would own it).
    null_lib.save(str(tmp_path / "c.null_text.safetensors"), null, source="leftover")
    assert cli.main(["convert", "--src", a, "--dst", f"release:{tmp_path / 'c.safetensors'}", "--quiet"]) == 2
    assert "c.null_text.safetensors" in capsys.readouterr().err and not os.path.exists(tmp_path / "c.safetensors")


def test_sidecar_names():
    # Issue 27: one per weights file, so X.safetensors and X.pt side by side do not share one.
    assert null_lib.sidecar_path("/x/dit.pt") == "/x/dit.pt.null_text.safetensors"
    assert null_lib.sidecar_path("/x/dit_ema.safetensors") == "/x/dit_ema.safetensors.null_text.safetensors"
    assert null_lib.sidecar_path("/x/shards/model.safetensors.index.json") == "/x/shards/model.null_text.safetensors"
    assert null_lib.sidecar_path("/x/weights") == "/x/weights.null_text.safetensors"


def test_exports_of_one_stem_in_two_formats_keep_their_own_sidecars(training_checkpoints, tmp_path):
    _, jdir, _, null = training_checkpoints
    st, pt = str(tmp_path / "x.safetensors"), str(tmp_path / "x.pt")
    assert cli.main(["convert", "--src", f"jax:{jdir}", "--dst", f"release:{st}", "--quiet"]) == 0
    # Before issue 27 this second export collided on x.null_text.safetensors and was refused.
    assert cli.main(["convert", "--src", f"jax:{jdir}", "--dst", f"release:{pt}", "--quiet", "--weights", "ema"]) == 0
    assert sorted(os.listdir(tmp_path)) == [
        "x.pt",
        "x.pt.null_text.safetensors",
        "x.safetensors",
        "x.safetensors.null_text.safetensors",
    ]
    for w in (st, pt):
        got, path = null_lib.find_sidecar(w)
        assert path == w + ".null_text.safetensors"
        np.testing.assert_array_equal(got, null)


def test_older_named_sidecars_are_read_while_one_weights_file_owns_them(tmp_path):
    null = np.arange(12, dtype=np.float32).reshape(3, 4)
    w = str(tmp_path / "dit.safetensors")
    open(w, "wb").close()
    old = null_lib.save(str(tmp_path / "dit.null_text.safetensors"), null, source="before issue 27")
    got, path = null_lib.find_sidecar(w)
    assert path == old
    np.testing.assert_array_equal(got, null)
    # A second weights file of that stem: the old name no longer says whose it is.
    open(tmp_path / "dit.pt", "wb").close()
    assert null_lib.find_sidecar(w) is None and null_lib.find_sidecar(str(tmp_path / "dit.pt")) is None
