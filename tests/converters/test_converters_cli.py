"""`python -m converters` in subprocesses: convert, inspect, verify, refusal to overwrite."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.helpers import DIT_WEIGHTS, dit_weights

REPO = Path(__file__).resolve().parents[2]


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "converters", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_convert_inspect_verify_and_overwrite_refusal(tmp_path):
    dst = tmp_path / "dit.pt"
    r = cli("convert", "--src", DIT_WEIGHTS, "--dst", f"release:{dst}", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "63 tensors" in r.stdout and "tiny (" in r.stdout
    assert "tensor" in r.stderr  # the progress bar goes to stderr

    r = cli("inspect", dst)
    assert r.returncode == 0, r.stderr
    assert "format: release" in r.stdout and "tensors: 63" in r.stdout
    assert "dtypes: 63 x bfloat16" in r.stdout and "config: tiny (" in r.stdout
    info = json.loads(cli("inspect", dst, "--json").stdout)
    assert info["size"] == 983856 * 2 and info["parameters"] == 983856

    # bf16 against the float32 original: different dtype, equal within bf16 rounding.
    r = cli("verify", DIT_WEIGHTS, dst, "--quiet")
    assert r.returncode == 1 and "dtype float32 vs bfloat16" in r.stdout
    r = cli("verify", DIT_WEIGHTS, dst, "--atol", "0.01", "--quiet")
    assert r.returncode == 0 and "equal (within atol 0.01): 63 tensors" in r.stdout

    before = dst.read_bytes()
    r = cli("convert", "--src", DIT_WEIGHTS, "--dst", f"release:{dst}")
    assert r.returncode == 2 and f"output {dst} already exists; pass --force" in r.stderr
    assert dst.read_bytes() == before
    r = cli("convert", "--src", DIT_WEIGHTS, "--dst", f"release:{dst}", "--force", "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("verify", DIT_WEIGHTS, dst, "--quiet")
    assert r.returncode == 0 and "equal (bit-identical): 63 tensors" in r.stdout


def test_cli_through_megatron_and_jax(tmp_path):
    r = cli(
        "convert",
        "--src",
        f"release:{DIT_WEIGHTS}",
        "--dst",
        f"megatron-legacy:{tmp_path}/lg",
        "--tp",
        "2",
        "--pp",
        "2",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    r = cli("convert", "--src", f"megatron:{tmp_path}/lg", "--dst", f"megatron:{tmp_path}/td", "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("convert", "--src", f"{tmp_path}/td", "--dst", f"jax:{tmp_path}/jx@3", "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("inspect", f"{tmp_path}/jx")
    assert "format: jax" in r.stdout and "step: 3" in r.stdout and "[stored in the checkpoint]" in r.stdout
    r = cli("verify", f"jax:{tmp_path}/jx", DIT_WEIGHTS, "--quiet")
    assert r.returncode == 0 and "equal (bit-identical): 63 tensors" in r.stdout, r.stdout + r.stderr


def test_verify_names_the_differing_tensor_and_errors_are_one_line(tmp_path):
    w = dict(dit_weights())
    w["blocks.1.attn.proj.bias"] = w["blocks.1.attn.proj.bias"] + np.float32(0.5)
    save_file(w, str(tmp_path / "changed.safetensors"))
    r = cli("verify", DIT_WEIGHTS, tmp_path / "changed.safetensors", "--quiet")
    assert r.returncode == 1
    assert "blocks.1.attn.proj.bias: values differ (max |a-b| = 0.5)" in r.stdout
    assert "1 problems over 63 compared tensors" in r.stdout
    r = cli("convert", "--src", tmp_path / "nope.pt", "--dst", f"jax:{tmp_path}/x")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path}/nope.pt does not exist"


def test_convert_makes_the_destinations_missing_parents(tmp_path, capsys):
    """Issue 25: `--dst release:/out/new/dir/dit.safetensors` under a directory that does not exist
    yet is made (it was refused); a parent that is a file is still refused in one line."""
    from converters.cli import main

    dst = tmp_path / "new" / "deeper" / "dit.safetensors"
    assert main(["convert", "--src", DIT_WEIGHTS, "--dst", f"release:{dst}", "--quiet"]) == 0
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dit.safetensors"]
    (tmp_path / "file").write_text("")
    assert main(["convert", "--src", DIT_WEIGHTS, "--dst", f"release:{tmp_path}/file/dit.pt", "--quiet"]) == 2
    assert f"error: output {tmp_path}/file/dit.pt: {tmp_path}/file is not a directory" in capsys.readouterr().err
