"""The launch scripts' argument handling, run on the CPU with `gcloud`, `srun`, `scontrol` and
`torchrun` stubbed (issue 25 item 5). The stubs record what they are given; the gcloud stub runs
the remote command locally in a fake worker (its own HOME and PATH) whose Python stubs record the
trainer's argv instead of training."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.doc_commands import doc_command, split_env

ROOT = Path(__file__).resolve().parents[2]
TUPLE = "--config.data.buckets=((2,4,6,8),)"  # README: tuples as strings
SPACED = "--config.note=two words; not a command"


def _script(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


def _fake_worker(tmp_path: Path, *, pythons=("python3.11",)) -> tuple[Path, Path]:
    """(worker HOME, worker PATH dir): the tools the remote commands use, and Python stubs whose
    `-m venv DIR` makes a venv whose python records `-m pip …` and `-m mugv_jax.train …`."""
    home, bin_dir = tmp_path / "worker_home", tmp_path / "worker_bin"
    home.mkdir()
    bin_dir.mkdir()
    for tool in ("bash", "tar", "gzip", "mkdir", "chmod", "hostname", "tee", "cat", "dirname"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    venv_python = (
        'log="$HOME/calls"\n'
        'if [[ "$1 $2" == "-m pip" ]]; then printf "pip %s\\n" "${*:3}" >> "$log"; exit 0; fi\n'
        'printf "%s\\0" "$@" > "$HOME/train_argv"\n'
        'echo "training on $(hostname)"\n'
        'exit "${TRAIN_EXIT:-0}"'
    )
    for name in pythons:
        _script(
            bin_dir / name,
            f'[[ "$1 $2" == "-m venv" ]] || exit 9\nmkdir -p "$3/bin"\n'
            f"cat > \"$3/bin/python\" <<'PY'\n#!/usr/bin/env bash\n{venv_python}\nPY\n"
            f'chmod +x "$3/bin/python"\necho "venv {name}" >> "$HOME/calls"',
        )
    return home, bin_dir


def _gcloud(tmp_path: Path, home: Path, worker_bin: Path) -> Path:
    """A gcloud stub: `scp SRC NODE:DEST` copies into the worker's HOME; `ssh NODE --command=CMD`
    runs CMD there with bash (TRAIN_EXIT from FAIL_NODE_<node> when set)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _script(
        bin_dir / "gcloud",
        f'printf "%s\\n" "$*" >> {tmp_path}/gcloud_calls\n'
        'args=("$@"); node=""; cmd=""\n'
        'for a in "${args[@]}"; do case "$a" in --command=*) cmd="${a#--command=}";; esac; done\n'
        'if [[ "${args[3]}" == scp ]]; then cp "${args[4]}" "' + str(home) + '/${args[5]#*:}"; exit 0; fi\n'
        'node="${args[4]}"; var="FAIL_NODE_${node//-/_}"\n'
        f'env -i HOME={home} PATH={worker_bin} TRAIN_EXIT="${{!var:-0}}" bash -c "$cmd"',
    )
    return bin_dir


def _run(script: str, args, env: dict, cwd=ROOT):
    return subprocess.run(
        ["bash", str(ROOT / "launch" / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _argv(home: Path) -> list[str]:
    return (home / "train_argv").read_text().split("\0")[:-1]


def test_tpu_pod_installs_into_a_venv_and_passes_each_argument_as_one(tmp_path):
    home, worker_bin = _fake_worker(tmp_path)
    env = dict(os.environ, PATH=f"{_gcloud(tmp_path, home, worker_bin)}{os.pathsep}{os.environ['PATH']}")
    env.update(TPU_NAME="pod", ZONE="z")
    res = _run("tpu_pod.sh", ["configs/mugv_10b.py:video_720", "gs://b/run", TUPLE, SPACED], env)
    assert res.returncode == 0, res.stderr
    argv = _argv(home)
    assert argv == [
        "-m",
        "mugv_jax.train",
        "--config=configs/mugv_10b.py:video_720",
        "--workdir=gs://b/run",
        "--distributed",
        TUPLE,
        SPACED,
    ]
    calls = (home / "calls").read_text().splitlines()
    assert calls == ["venv python3.11", f"pip install -q -e {home}/mugv[tpu]"]  # not the system python
    assert (home / "mugv" / "pyproject.toml").exists() and not (home / "mugv" / ".git").exists()
    assert "training on" in (home / "mugv_train.log").read_text()
    # A failing run fails the script, through the remote `| tee` (pipefail); SKIP_COPY reuses the venv.
    env.update(SKIP_COPY="1", FAIL_NODE_pod="3")
    res = _run("tpu_pod.sh", ["configs/tiny.py", "/w"], env)
    assert res.returncode == 3 and _argv(home)[2:4] == ["--config=configs/tiny.py", "--workdir=/w"]


def test_tpu_pod_without_a_supported_python_says_so(tmp_path):
    home, worker_bin = _fake_worker(tmp_path, pythons=())
    env = dict(os.environ, PATH=f"{_gcloud(tmp_path, home, worker_bin)}{os.pathsep}{os.environ['PATH']}")
    env.update(TPU_NAME="pod", ZONE="z", MUGV_PYTHON="/opt/py/bin/python3.12")
    res = _run("tpu_pod.sh", ["configs/tiny.py", "/w"], env)
    assert res.returncode == 1 and not (home / "train_argv").exists()
    assert "no supported Python (tried /opt/py/bin/python3.12 python3.11 python3.12 python3.13)" in res.stderr
    assert "MUGV_PYTHON" in res.stderr


def test_tpu_multislice_waits_for_every_slice_and_names_the_failed_one(tmp_path):
    home, worker_bin = _fake_worker(tmp_path)
    env = dict(os.environ, PATH=f"{_gcloud(tmp_path, home, worker_bin)}{os.pathsep}{os.environ['PATH']}")
    env.update(QR_NAME="qr", ZONE="z", NUM_SLICES="2", FAIL_NODE_qr_1="4")
    res = _run("tpu_multislice.sh", ["configs/tiny.py", "/w", TUPLE], env)
    assert res.returncode == 1 and "training failed on qr-1 (exit 4)" in res.stderr, res.stderr
    assert "qr-0" not in res.stderr.split("failed on")[1]
    assert _argv(home)[5:] == ["--config.mesh.dcn.data=2", TUPLE]
    ssh = [c for c in (tmp_path / "gcloud_calls").read_text().splitlines() if " ssh " in c and "mugv_jax.train" in c]
    assert sorted(c.split()[4] for c in ssh) == ["qr-0", "qr-1"]
    env.pop("FAIL_NODE_qr_1")
    env["SKIP_COPY"] = "1"
    assert _run("tpu_multislice.sh", ["configs/tiny.py", "/w"], env).returncode == 0


def _slurm(tmp_path: Path, script: str) -> tuple[Path, dict]:
    """The batch script as Slurm runs it (a copy in a spool directory, submitted from another
    directory), with scontrol/srun/torchrun/python stubs; returns (the copy, env)."""
    spool, elsewhere, bin_dir = tmp_path / "spool", tmp_path / "elsewhere", tmp_path / "bin"
    for d in (spool, elsewhere, bin_dir):
        d.mkdir(exist_ok=True)
    shutil.copy(ROOT / "launch" / script, spool / "slurm_script")
    record = 'printf "%s\\0" "$PWD" "$@" > ' + str(tmp_path / "argv")
    _script(
        bin_dir / "scontrol",
        '[[ -n "${SCONTROL_DOWN:-}" ]] && exit 1\n'
        f'[[ "$1 $2" == "show job" ]] && echo "   Command={ROOT}/launch/{script}" && exit 0\n'
        '[[ "$1 $2" == "show hostnames" ]] && echo node1',
    )
    _script(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"')
    _script(bin_dir / "torchrun", record)
    _script(bin_dir / "python", record)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="7")
    env.update(SLURM_SUBMIT_DIR=str(elsewhere), SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", GPUS_PER_NODE="8")
    for k in ("CONFIG", "WORKDIR", "TP_SIZE", "SP", "PP_SIZE", "CP_SIZE", "MUGV_REPO", "PYTHON"):
        env.pop(k, None)
    return spool / "slurm_script", env


@pytest.mark.parametrize("script", ["megatron_slurm.sbatch", "jax_gpu_slurm.sbatch"])
def test_slurm_scripts_find_the_checkout_from_anywhere(tmp_path, script):
    copy, env = _slurm(tmp_path, script)
    args = ["configs/tiny.py", "/runs/x"] if script.startswith("jax") else []
    res = subprocess.run(
        ["bash", str(copy), *args, SPACED], cwd=env["SLURM_SUBMIT_DIR"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    cwd, *argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert cwd == str(ROOT) and argv[-1] == SPACED
    if script.startswith("jax"):
        assert argv[:4] == ["-m", "mugv_jax.train", "--config=configs/tiny.py", "--workdir=/runs/x"]
    else:
        assert "--config=configs/mugv_10b.py:video_720:h100x64" in argv and "--master_addr" in argv
    # Nothing says where the checkout is (no scontrol answer, submitted from elsewhere): the error
    # names the way out.
    env["SCONTROL_DOWN"] = "1"
    res = subprocess.run(
        ["bash", str(copy), *args], cwd=env["SLURM_SUBMIT_DIR"], env=env, capture_output=True, text=True
    )
    assert res.returncode != 0 and "cannot find the mugv checkout" in res.stderr and "MUGV_REPO" in res.stderr


# The launch commands the docs show, as written (tests/doc_commands.py), with the cluster stubbed:
# `sbatch --nodes=N` runs the script with bash under the Slurm stubs above, gcloud is the stub
# that runs each worker's command locally.
GCLOUD_DOCS = {
    "tpu_pod": lambda: doc_command("launch/tpu_pod.sh", "TPU_NAME="),
    "tpu_multislice": lambda: doc_command("launch/tpu_multislice.sh", "QR_NAME="),
}
SLURM_DOCS = {
    "jax_gpu_slurm": lambda: doc_command(
        "launch/jax_gpu_slurm.sbatch", "sbatch --nodes=8", {"sbatch --nodes=8": "bash"}
    ),
    "megatron_slurm_defaults": lambda: doc_command(
        "launch/megatron_slurm.sbatch", "sbatch --nodes=8", {"sbatch --nodes=8": "bash"}
    ),
    "megatron_slurm": lambda: doc_command("launch/megatron_slurm.sbatch", "CONFIG=", {"sbatch --nodes=16": "bash"}),
    "readme_megatron_slurm": lambda: doc_command(
        "README.md", "CONFIG=configs/mugv_10b.py:video_720:h100x128", {"sbatch --nodes=16": "bash"}
    ),
    "megatron_training_slurm": lambda: doc_command(
        "docs/megatron_training.md", "CONFIG=configs/mugv_10b.py:video_720:h100x128", {"sbatch --nodes=16": "bash"}
    ),
    "megatron_torchrun": lambda: doc_command("launch/megatron_torchrun.sh", "CONFIG="),
    "megatron_training_torchrun": lambda: doc_command(
        "docs/megatron_training.md", "CONFIG=configs/mugv_10b.py:video_720 WORKDIR"
    ),
}


def _trainer_gets(argv: list[str], config: str | None, workdir: str | None, flags: list[str]) -> None:
    """The trainer's argv names the documented config and workdir and ends with the doc's flags."""
    if config:
        assert f"--config={config}" in argv, argv
    if workdir:
        assert f"--workdir={workdir}" in argv, argv
    assert argv[len(argv) - len(flags) :] == flags, (argv, flags)


@pytest.mark.parametrize("case", sorted(GCLOUD_DOCS))
def test_documented_tpu_launch_commands_run_as_written(tmp_path, case):
    doc_env, (script, *args) = split_env(GCLOUD_DOCS[case]())
    home, worker_bin = _fake_worker(tmp_path)
    env = dict(os.environ, PATH=f"{_gcloud(tmp_path, home, worker_bin)}{os.pathsep}{os.environ['PATH']}", **doc_env)
    res = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    config, workdir, *flags = args
    _trainer_gets(_argv(home), config, workdir, flags)


@pytest.mark.parametrize("case", sorted(SLURM_DOCS))
def test_documented_gpu_launch_commands_run_as_written(tmp_path, case):
    doc_env, (bash, script, *args) = split_env(SLURM_DOCS[case]())
    assert bash == "bash"
    _, env = _slurm(tmp_path, Path(script).name)
    env.update(doc_env)
    res = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cwd, *argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert cwd == str(ROOT)
    if "jax" in script:
        config, workdir, *flags = args
    else:  # the Megatron scripts take CONFIG and WORKDIR as variables
        config, workdir, flags = doc_env.get("CONFIG"), doc_env.get("WORKDIR"), args
    _trainer_gets(argv, config, workdir, flags)


def test_the_tpu_tarball_leaves_out_environments_caches_and_outputs(tmp_path):
    """A checkout that ran the tests holds .venv and .venv-py312 (GBs): the copy sent to every
    TPU worker must not (it took 96 s to pack one here before)."""
    repo, out = tmp_path / "repo", tmp_path / "src.tgz"
    for name in (
        "mugv/a.py",
        "configs/outputs.py",
        ".venv/big",
        ".venv-py312/big",
        ".git/HEAD",
        "outputs/x",
        "mugv.egg-info/PKG-INFO",
        ".ruff_cache/x",
        ".pytest_cache/x",
        "mugv/__pycache__/a.pyc",
    ):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    cmd = f'source "{ROOT}/launch/tpu_common.sh"; tpu_pack "{repo}" "{out}"'
    subprocess.run(["bash", "-c", cmd], check=True, timeout=60)
    names = subprocess.run(["tar", "-tzf", str(out)], check=True, capture_output=True, text=True).stdout.split()
    files = sorted(n.removeprefix("./") for n in names if not n.endswith("/"))
    assert files == ["configs/outputs.py", "mugv/a.py"], files
