"""configs/mugv_10b.py carries a layout for every stage × pod that the trainer can run as is."""

import os
import sys

import pytest

from mugv_jax import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import mcore  # noqa: E402
import mugv_10b  # noqa: E402


@pytest.mark.parametrize("pod", sorted(mugv_10b.PODS))
@pytest.mark.parametrize("stage", list(mugv_10b.STAGES))
def test_every_stage_has_a_layout_for_every_pod(stage, pod):
    c = mugv_10b.get_config(f"{stage}:{pod}")
    spec = mugv_10b.PODS[pod]
    mesh = dict(c.mesh.ici)
    assert mesh["data"] * mesh["fsdp"] * mesh["tensor"] * mesh["context"] == spec["devices"]
    assert (c.target.name, c.target.kind, c.target.devices) == (pod, spec["kind"], spec["devices"])
    assert c.target.kind in plan_lib.DEVICE_KINDS
    # One global batch per stage, which is also what the shard loader reads.
    batches = {b[3] for b in c.data.buckets}
    assert batches == {c.data.batch_size}
    accum = c.optim.grad_accum_steps
    if c.mode == "preference":
        assert accum == 1  # the preference step does not accumulate
    # Every bucket (video and mixed-in images) splits into micro-batches that divide by data × fsdp:
    # the planner's own check, which names the bucket otherwise.
    for b in plan_lib.plan_buckets(c):
        plan_lib.check_batch_split(b[3], accum, mesh)
    # Context parallelism is spelled in the attention string, and only where the mesh has it.
    assert ("+" in c.attention) == (mesh["context"] > 1)
    assert c.remat in ("full", "dots_no_batch", "dots", "none")


def test_default_pod_and_run_root_syntax():
    c = mugv_10b.get_config("video_720")
    assert c.target.name == "v5p-256" and c.stage == "video_720"
    assert c.init_from == "jax:runs/mugv_10b/video_360_5s/checkpoints"
    c = mugv_10b.get_config("video_720:h100x64@gs://bucket/run")
    assert c.target.name == "h100x64" and c.init_from == "jax:gs://bucket/run/video_360_5s/checkpoints"
    c = mugv_10b.get_config("video_720@/r")  # the root alone keeps the default pod
    assert c.target.name == "v5p-256" and c.init_from == "jax:/r/video_360_5s/checkpoints"
    # The Megatron wrapper passes the whole argument through.
    assert mcore.get_config("mugv_10b:video_720:h100x128").target.name == "h100x128"
    with pytest.raises(ValueError, match="unknown pod 'v7-9'"):
        mugv_10b.get_config("video_720:v7-9")


def test_pods_count_devices_as_jax_sees_them():
    # A v5p-N slice counts TensorCores (two per chip); JAX shows one device per chip. v6e-N and
    # h100xN count chips/GPUs.
    assert mugv_10b.pod_devices("v5p-256") == 128 and mugv_10b.pod_devices("v5p-16") == 8
    assert mugv_10b.pod_devices("v6e-256") == 256 and mugv_10b.pod_devices("h100x64") == 64
    assert {k: v["devices"] for k, v in mugv_10b.PODS.items()} == {
        "v5p-256": 128,
        "v6e-256": 256,
        "h100x64": 64,
        "h100x128": 128,
    }
    with pytest.raises(ValueError, match="odd core count"):
        mugv_10b.pod_devices("v5p-9")
    with pytest.raises(ValueError, match="expected v5p-N"):
        mugv_10b.pod_devices("tpu")


def test_layouts_are_validated():
    c = mugv_10b.get_config("video_720")
    saved = dict(mugv_10b.LAYOUTS)
    try:
        # v5p-256 is 128 chips: a 256-device mesh (the layouts before the pod-size fix) is refused.
        mugv_10b.LAYOUTS[("720p_5s", "v5p-256")] = ((1, 32, 1, 8), "xla+ring", "full", 2)
        with pytest.raises(ValueError, match="does not cover 128 devices"):
            mugv_10b.get_config("video_720")
        mugv_10b.LAYOUTS[("720p_5s", "v5p-256")] = ((1, 8, 1, 16), "xla+ring", "full", 3)
        with pytest.raises(ValueError, match="global batch 256 is not a multiple"):
            mugv_10b.get_config("video_720")
    finally:
        mugv_10b.LAYOUTS.clear()
        mugv_10b.LAYOUTS.update(saved)
    assert mugv_10b.get_config("video_720").mesh.ici == c.mesh.ici


def test_planner_refuses_a_micro_batch_the_mesh_cannot_split():
    with pytest.raises(ValueError, match="not divisible by optim.grad_accum_steps=3"):
        plan_lib.check_batch_split(256, 3, {"data": 1, "fsdp": 32})
    with pytest.raises(ValueError, match=r"micro-batch 16 .* not divisible by data × fsdp = 32"):
        plan_lib.check_batch_split(256, 16, {"data": 1, "fsdp": 32, "context": 8})
    plan_lib.check_batch_split(256, 8, {"data": 1, "fsdp": 32, "context": 8})
