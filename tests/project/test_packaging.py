"""What pyproject.toml and the lock files promise: tested ranges (no exact pins that would
downgrade a cluster image), torch only behind the `megatron` extra, and lock files that pin the
sets CI installs (torch with megatron-core on Python 3.11; none at all in the JAX leg)."""

import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _lock(name):
    pins = {}
    for line in open(os.path.join(ROOT, "constraints", name)):
        line = line.strip()
        if line and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            assert version, f"constraints/{name}: {line!r} is not an exact pin"
            pins[pkg.lower().replace("_", "-")] = version
    return pins


def _name(requirement):
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_supported_pythons_and_ranges_not_pins():
    p = _project()
    assert p["requires-python"] == ">=3.11,<3.14"
    for req in p["dependencies"] + [r for reqs in p["optional-dependencies"].values() for r in reqs]:
        assert "==" not in req or _name(req) == "ruff", f"{req}: state a tested range, not a pin"


def test_torch_only_with_the_megatron_extra():
    p = _project()
    base = {_name(r) for r in p["dependencies"]}
    assert not base & {"torch", "megatron-core", "transformer-engine"}
    megatron = {_name(r) for r in p["optional-dependencies"]["megatron"]}
    assert {"torch", "megatron-core"} <= megatron
    assert "torch" not in {_name(r) for r in p["optional-dependencies"]["test"]}


def test_lock_files_pin_what_each_leg_installs():
    full, leg = _lock("ci-py311.txt"), _lock("ci-py312-jax.txt")
    assert full["torch"] == "2.13.0" and full["megatron-core"] == "0.16.1" and full["jax"] == "0.10.2"
    assert "torch" not in leg and "megatron-core" not in leg
    assert leg["jax"] == leg["jaxlib"] and leg["jax"].split(".")[:2] == ["0", "12"]
    # Every requirement of the base and of the legs' extras is pinned by its lock file.
    p = _project()
    for req in p["dependencies"] + p["optional-dependencies"]["test"]:
        assert _name(req) in full and _name(req) in leg, req
    for extra in ("megatron", "data", "dev"):
        for req in p["optional-dependencies"][extra]:
            if not req.startswith("mugv["):
                assert _name(req) in full, req
