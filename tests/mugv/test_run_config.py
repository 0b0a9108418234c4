"""The typed run config (mugv/run/config.py): built once from the ml_collections dict, errors that
name the `--config.` flag, `model_overrides` from the command line, the batch split, the
source-following `init_weights`, and the short errors of the command lines (mugv/run/cli.py)."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base, main, mugv_10b, tiny, tiny_curriculum, tiny_preference
from mugv.run import cli
from mugv.run.config import ConfigError, DataConfig, LoopConfig, RunConfig, as_run_config, check_split
from mugv.training import MegatronOptions, ObjectiveConfig, OptimConfig, PreferenceConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden", "dit_tiny", "weights.safetensors")


def _flags(argv):
    """`--config=... --config.a.b=...` parsed as the trainers parse them (a fresh flag set)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    with mock.patch.object(sys, "argv", ["prog", *argv]):  # ml_collections reads its overrides there
        cli.parse_flags(sys.argv, fv)
    return fv.config


# --- one place for the defaults -------------------------------------------------------------------


def test_base_config_is_the_dataclass_defaults_and_every_config_round_trips():
    # configs/base.py holds no default of its own: it is RunConfig()'s, section by section.
    assert as_run_config(base.base_config()) == RunConfig()
    run = RunConfig()
    for section, cls in (
        ("optim", OptimConfig),
        ("objective", ObjectiveConfig),
        ("megatron", MegatronOptions),
        ("preference", PreferenceConfig),
    ):
        assert getattr(run, section) == cls()
        assert dict(base.base_config()[section]) == json.loads(json.dumps(cls().__dict__))
    assert run.max_nonfinite_in_a_row == LoopConfig.max_nonfinite_in_a_row
    configs = [tiny.get_config(), tiny_preference.get_config("x.jsonl"), main.get_config("quick").dit]
    configs += [tiny_curriculum.get_config(s) for s in tiny_curriculum.STAGES]
    configs += [mugv_10b.get_config(f"{s}:{p}") for s in mugv_10b.STAGES for p in ("v5p-256", "h100x64")]
    for c in configs:
        run = as_run_config(c)
        # config.json (plain JSON) gives the same run back, and so does its ConfigDict.
        back = json.loads(json.dumps(run.to_dict()))
        assert as_run_config(back) == run and as_run_config(run.to_config_dict()) == run
    assert as_run_config(tiny_curriculum.get_config("small")).model_config.hidden_size == 72


def test_the_model_config_is_derived_once_with_errors_naming_the_flags():
    c = tiny.get_config()
    c.model_overrides.hidden_size = 150
    with pytest.raises(
        ConfigError, match=r"--config.model='tiny' --config.model_overrides.hidden_size=150: .*divisible"
    ):
        as_run_config(c)
    run = as_run_config(tiny.get_config())
    assert run.model_config is run.model_config and run.model_config.hidden_size == 144


# --- typos and values, in config files and on the command line --------------------------------


def test_unknown_fields_name_the_flag_and_the_nearest_field():
    c = tiny.get_config()
    c.optim.learnig_rate = 1.0  # an unlocked ConfigDict takes it: the typed config refuses it
    with pytest.raises(ConfigError) as e:
        as_run_config(c)
    assert str(e.value) == "--config.optim.learnig_rate: no such field; did you mean --config.optim.learning_rate?"
    c = tiny.get_config()
    c.model_overrides.hiden_size = 72
    with pytest.raises(ConfigError, match=r"did you mean --config.model_overrides.hidden_size\?"):
        as_run_config(c)
    with pytest.raises(ConfigError, match=r"--config.zzz: no such field; the config has: .*model_overrides"):
        as_run_config({"zzz": 1})
    with pytest.raises(ConfigError, match=r"--config.optim.learning_rate='fast': expected float"):
        as_run_config({"optim": {"learning_rate": "fast"}})
    with pytest.raises(ConfigError, match=r"--config.optim.schedule must be 'constant' or 'cosine', got 'cosin'"):
        as_run_config({"optim": {"schedule": "cosin"}})
    with pytest.raises(ConfigError, match=r"--config.mode='dpo': must be one of 'pretrain', 'preference'"):
        as_run_config({"mode": "dpo"})
    with pytest.raises(ConfigError, match=r"--config.data.buckets\[0\]=\(2, 4, 6\): expected 4 values"):
        as_run_config({"data": {"buckets": [[2, 4, 6]]}})


def test_model_overrides_take_any_model_field_from_the_command_line():
    # docs/training_recipe.md step 0 (and the trainer's own hint for a text width mismatch).
    c = _flags(
        [
            "--config=configs/mugv_10b.py:image_360",
            "--config.model_overrides.hidden_size=1728",
            "--config.model_overrides.num_heads=24",
            "--config.model_overrides.patch_size=(1,2,2)",
            "--config.init_from=",
        ]
    )
    model = as_run_config(c).model_config
    assert (model.hidden_size, model.num_heads, model.depth, model.patch_size) == (1728, 24, 56, (1, 2, 2))
    assert as_run_config(c).to_dict()["model_overrides"] == {
        "hidden_size": 1728,
        "num_heads": 24,
        "patch_size": (1, 2, 2),
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--config.optim.learnig_rate=1"],
            "error: --config.optim.learnig_rate: no such field; did you mean --config.optim.learning_rate?",
        ),
        (
            ["--config.model_overrides.hiden_size=1728"],
            "error: --config.model_overrides.hiden_size: no such field; "
            "did you mean --config.model_overrides.hidden_size?",
        ),
        (["--config.optm.b1=0.8"], "error: --config.optm: no such field; did you mean --config.optim?"),
        (["--config.seed.x=1"], "error: --config.seed.x: config.seed is a value, not a section"),
    ],
)
def test_a_typo_on_the_command_line_is_one_line_naming_the_nearest_field(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _flags(["--config=configs/tiny.py", *argv])
    assert e.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == message


def test_every_command_line_that_takes_config_answers_a_typo_in_one_line():
    """Both trainers, both planners and the main job, as a user runs them: one line, exit 2, no
    traceback (the error comes from flag parsing, before jax or torch load)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    commands = [
        ["mugv_jax.train", "--config=configs/tiny.py", "--workdir=unused", "--config.optim.learnig_rate=1"],
        ["mugv_megatron.train", "--config=configs/tiny.py", "--workdir=unused", "--config.optim.learnig_rate=1"],
        ["mugv_jax.plan", "--config=configs/tiny.py", "--devices=8", "--config.optim.learnig_rate=1"],
        ["mugv_megatron.plan", "--config=configs/tiny.py", "--gpus=8", "--config.optim.learnig_rate=1"],
        ["main_job", "--quick", "--workdir=unused", "--config.dit.optim.learnig_rate=1"],
    ]
    for module, *args in commands:
        p = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert p.returncode == cli.EXIT_USAGE, (module, p.stderr[-2000:])
        section = "dit.optim" if module == "main_job" else "optim"
        assert p.stderr.strip() == (
            f"error: --config.{section}.learnig_rate: no such field; did you mean --config.{section}.learning_rate?"
        ), (module, p.stderr[-2000:])
    # A run config that does not validate: the same one line from inside main.
    p = subprocess.run(
        [sys.executable, "-m", "mugv_jax.train", "--config=configs/tiny.py", "--workdir=unused"]
        + ["--config.optim.schedule=cosin"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == cli.EXIT_USAGE and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip() == "error: --config.optim.schedule must be 'constant' or 'cosine', got 'cosin'"


# --- what the run takes from its config -------------------------------------------------------


def test_init_weights_follow_the_source():
    # Every 10B stage sets init_weights="ema" for its jax: hand-over; the documented release start
    # overrides only init_from (README, docs/megatron_training.md): the file's weights are used.
    stage = _flags(["--config=configs/mugv_10b.py:video_720", f"--config.init_from={GOLDEN}"])
    assert stage.init_weights == "ema"
    assert as_run_config(stage).starting_weights() == (GOLDEN, "raw")
    assert as_run_config(mugv_10b.get_config("video_720")).starting_weights()[1] == "ema"  # jax:
    assert RunConfig(init_from="megatron:/x", init_weights="ema").starting_weights() == ("megatron:/x", "ema")
    assert RunConfig().starting_weights() is None
    with pytest.raises(ConfigError, match=r"--config.init_weights='EMA': must be one of 'raw', 'ema'"):
        RunConfig(init_weights="EMA")


def test_batch_split_is_refused_naming_the_flag_and_what_would_divide():
    run = as_run_config({"data": {"buckets": [[2, 4, 6, 8], [3, 4, 4, 12]]}, "optim": {"grad_accum_steps": 2}})
    run.check_batch_split({"data": 2, "fsdp": 1, "tensor": 2})  # micro-batches 4 and 6 over 2 ranks
    with pytest.raises(ConfigError) as e:
        run.check_batch_split({"data": 4, "fsdp": 1})
    assert str(e.value).splitlines() == [
        "--config.data.buckets[1]=(3, 4, 4, 12): global batch 12 is not a multiple of optim.grad_accum_steps × "
        "data-parallel ranks (2 × 4): its micro-batch 6 (global batch 12 / optim.grad_accum_steps=2) is not "
        "divisible by data × fsdp = 4 (mesh {'data': 4, 'fsdp': 1});",
        "  set --config.optim.grad_accum_steps to one of [1, 3]",
    ]
    shards = run.replace(data=DataConfig(source="shards", batch_size=9))
    with pytest.raises(ConfigError, match=r"--config.data.batch_size=9: .* not divisible by optim.grad_accum_steps=2"):
        shards.check_batch_split(1, "one rank")
    with pytest.raises(ConfigError, match=r"make the global batch a multiple of 4"):
        check_split(10, 1, 4, "--config.preference.batch_size=10", "the data-parallel size 4")
    pref = as_run_config(tiny_preference.get_config("x.jsonl"))
    assert pref.global_batches() == [("--config.preference.batch_size=8", 8)]


def test_the_planner_the_configs_and_the_trainers_share_the_check():
    from mugv_jax import plan

    assert plan.check_batch_split is mugv_10b.check_batch_split
    from mugv.run import config as run_config

    assert plan.check_batch_split is run_config.check_batch_split
