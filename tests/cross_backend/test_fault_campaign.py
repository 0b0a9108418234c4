"""A seeded slice of the fault campaign (bench/fault_campaign.py; the full table: docs/benchmarks.md).

One run per trainer takes three faults: the JAX run a SIGKILL at a random moment (often inside an
asynchronous save), the Megatron run a SIGTERM to its whole process group after its first save
(which crashed the save it asked for, exit 1, before issue 26), then one byte of the newest
checkpoint with recorded checksums changes; each resumes to the end and must equal an
uninterrupted run bit for bit, with the changed checkpoint reported and moved aside. A shard of a
small dataset is deleted, truncated or garbled; a conversion is killed mid-write and run again.
Nothing may end silently wrong or lose data.
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = 0


def _campaign():
    spec = importlib.util.spec_from_file_location("fault_campaign", os.path.join(ROOT, "bench", "fault_campaign.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeded_fault_campaign_ends_identical_or_loud():
    fc = _campaign()
    counts, lines = fc.campaign(
        trials=1,
        seed=SEED,
        classes=("lineage", "shards", "convert"),
        signals={"jax": "kill", "megatron": "group-term"},
        log=lambda line: None,
    )
    report = "\n".join(lines)
    for c in counts.values():
        assert c["silently wrong"] == 0 and c["data lost"] == 0, report
    lineage = [line for line in lines if line.startswith("lineage")]
    assert len(lineage) == 2 and all(": identical" in line for line in lineage), report
    assert "kill:" in lineage[0] and "group-term:" in lineage[1], report
    assert sum(c["identical"] + c["refused loudly"] for c in counts.values()) == 4, report
