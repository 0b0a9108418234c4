"""The one checkpoint spec grammar (mugv/io/spec.py): `[FORMAT:]PATH[@N]`, aliases, detection of
unprefixed paths, `open_reader` for every format, and errors that name the spec. What a format
looks like on disk is faked with its marker files: detection reads nothing else."""

import json
import os

import pytest

from mugv.io import orbax, spec, torch_dist
from mugv.io.megatron import LEGACY_FILE, TRACKER, iter_dir_name, rank_dir_name
from mugv.io.release import ST_INDEX
from tests.helpers import DIT_WEIGHTS


@pytest.mark.parametrize(
    "text,fmt,path,number",
    [
        ("release:/a/dit.pt", "release", "/a/dit.pt", None),
        ("hf:/a/shards", "release", "/a/shards", None),
        ("jax:/runs/x/checkpoints@20", "jax", "/runs/x/checkpoints", 20),
        ("orbax:/runs/x", "jax", "/runs/x", None),
        ("megatron:/m@3", "megatron", "/m", 3),
        ("torch_dist:/m", "megatron", "/m", None),
        ("megatron-legacy:/m@2", "megatron-legacy", "/m", 2),
        ("legacy:/m", "megatron-legacy", "/m", None),
        ("megatron_legacy:/m", "megatron-legacy", "/m", None),
        ("/plain/dir@7", None, "/plain/dir", 7),
        ("jax:/a/b@c", "jax", "/a/b@c", None),  # only digits after the last @ are a number
        ("weights:tiny.pt", None, "weights:tiny.pt", None),  # a colon naming no format is path
    ],
)
def test_every_format_alias_and_number(text, fmt, path, number):
    s = spec.parse_spec(text)
    assert (s.format, s.path, s.number) == (fmt, path, number)
    assert spec.parse_spec(str(s)) == s  # a Spec prints as a spec that parses back to it
    assert spec.parse_spec(s) is s


def test_home_is_expanded():
    assert spec.parse_spec("jax:~/ck@1").path == os.path.expanduser("~/ck")


def test_errors_name_the_spec(tmp_path):
    with pytest.raises(ValueError, match=r"'jax:': no path \(expected \[FORMAT:\]PATH\[@N\]"):
        spec.parse_spec("jax:")
    with pytest.raises(ValueError, match=r"release:dit\.pt@3: a release checkpoint has no steps or iterations"):
        spec.parse_spec("release:dit.pt@3")
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}/gone does not exist$"):
        spec.resolve(f"jax:{tmp_path}/gone")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match=r"junk: cannot tell the checkpoint format .* name it as FORMAT:PATH"):
        spec.resolve(str(tmp_path / "junk"))
    # Detected as a release file, which has no steps: the number is refused, naming the spec.
    with pytest.raises(ValueError, match=rf"{DIT_WEIGHTS}@2: a release checkpoint has no steps"):
        spec.resolve(f"{DIT_WEIGHTS}@2")


def _jax_step(d):
    os.makedirs(os.path.join(d, orbax.STATE))
    with open(os.path.join(d, orbax.STATE, "_METADATA"), "w") as f:
        json.dump({"tree_metadata": {}}, f)


def _megatron(save_dir, iteration, variant):
    it = os.path.join(save_dir, iter_dir_name(iteration))
    if variant == "torch_dist":
        os.makedirs(it)
        for name in ("metadata.json", ".metadata"):
            open(os.path.join(it, name), "w").close()
    else:
        os.makedirs(os.path.join(it, rank_dir_name(0, 0, 1)))
        open(os.path.join(it, rank_dir_name(0, 0, 1), LEGACY_FILE), "w").close()
    with open(os.path.join(save_dir, TRACKER), "w") as f:
        f.write(str(iteration))
    return it


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """{what: path} of one checkpoint of every kind, as its marker files."""
    root = tmp_path_factory.mktemp("formats")
    out = {"release file": DIT_WEIGHTS}
    shards = root / "shards"
    shards.mkdir()
    (shards / ST_INDEX).write_text(json.dumps({"weight_map": {}}))
    out["release shards"] = str(shards)
    _jax_step(str(root / "run" / orbax.WORKDIR_CHECKPOINTS / "5"))
    out["jax workdir"] = str(root / "run")
    out["jax manager"] = str(root / "run" / orbax.WORKDIR_CHECKPOINTS)
    out["jax step"] = str(root / "run" / orbax.WORKDIR_CHECKPOINTS / "5")
    out["torch_dist iteration"] = _megatron(str(root / "td"), 3, "torch_dist")
    out["torch_dist save"] = str(root / "td")
    out["legacy iteration"] = _megatron(str(root / "lg"), 2, "legacy")
    out["legacy save"] = str(root / "lg")
    return out


@pytest.mark.parametrize(
    "what,fmt",
    [
        ("release file", "release"),
        ("release shards", "release"),
        ("jax workdir", "jax"),
        ("jax manager", "jax"),
        ("jax step", "jax"),
        ("torch_dist save", "megatron"),
        ("torch_dist iteration", "megatron"),
        ("legacy save", "megatron-legacy"),
        ("legacy iteration", "megatron-legacy"),
    ],
)
def test_unprefixed_files_and_directories_are_detected(on_disk, what, fmt):
    assert spec.detect_format(on_disk[what]) == fmt
    assert spec.resolve(on_disk[what]).format == fmt


def test_resolve_keeps_the_number_and_narrows_megatron_to_legacy(on_disk):
    assert spec.resolve(f"{on_disk['jax manager']}@5") == spec.Spec("jax", on_disk["jax manager"], 5)
    assert spec.resolve(f"megatron:{on_disk['legacy save']}@2").format == "megatron-legacy"
    assert spec.resolve(f"torch_dist:{on_disk['torch_dist save']}").format == "megatron"


class _Opened:
    def __init__(self, *args):
        self.args = args


def test_open_reader_hands_path_number_and_weights_to_each_format(on_disk, monkeypatch):
    monkeypatch.setattr(orbax, "JaxReader", _Opened)
    monkeypatch.setattr(torch_dist, "TorchDistReader", _Opened)
    assert spec.open_reader(f"orbax:{on_disk['jax workdir']}@5", weights="ema").args == (
        on_disk["jax workdir"],
        5,
        "ema",
    )
    assert spec.open_reader(on_disk["torch_dist save"]).args == (on_disk["torch_dist save"], None, "raw")
    legacy = spec.open_reader(f"{on_disk['legacy save']}@2", legacy=_Opened)
    assert legacy.args == (on_disk["legacy save"], 2)
    release = spec.open_reader(DIT_WEIGHTS)
    assert release.format == "release" and len(release.entries()) == 63


def test_open_reader_refusals_name_the_spec_and_the_way_out(on_disk):
    save = on_disk["legacy save"]
    with pytest.raises(ValueError, match=rf"^{save} is a legacy Megatron checkpoint .* convert --src megatron-legacy:"):
        spec.open_reader(save)
    with pytest.raises(ValueError, match=rf"^megatron:{save}: --weights ema needs a torch_dist training checkpoint"):
        spec.open_reader(f"megatron:{save}", weights="ema", legacy=_Opened)
    with pytest.raises(ValueError, match=rf"^release:{DIT_WEIGHTS}: --weights ema needs a JAX or Megatron"):
        spec.open_reader(f"release:{DIT_WEIGHTS}", weights="ema")


def test_init_from_reads_the_same_grammar(on_disk):
    """`config.init_from` takes the same specs, aliases included, and names its own config keys."""
    from mugv.io import weights
    from mugv.run.config import RunConfig

    def weights_read(init_from):
        return RunConfig(init_from=init_from, init_weights="ema").starting_weights()[1]

    assert weights_read(f"orbax:{on_disk['jax workdir']}") == "ema"
    assert weights_read(f"torch_dist:{on_disk['torch_dist save']}") == "ema"
    assert weights_read(on_disk["jax workdir"]) == "ema"  # detected on disk
    # A release file holds one set of weights: that set is read whatever init_weights says (issue
    # 25: the 10B stages set "ema" for their jax: hand-over; a release start changes init_from only).
    assert weights_read("/some/dit.pt") == weights_read(f"release:{DIT_WEIGHTS}") == "raw"
    with pytest.raises(ValueError, match=r"config.init_from=.* is a legacy Megatron checkpoint .* convert --src"):
        weights.open_weights(on_disk["legacy save"], model="tiny")
    with pytest.raises(FileNotFoundError, match=r"^config.init_from=jax:/no/such: /no/such does not exist$"):
        weights.open_weights("jax:/no/such", model="tiny")
    with pytest.raises(ValueError, match=rf"^{DIT_WEIGHTS} is a release checkpoint; JAX params are read from jax:"):
        weights.load_params(DIT_WEIGHTS)
