"""Training configs: every stage builds a valid run description."""

import pytest

from configs import mugv_10b, tiny, vae_release, vae_tiny
from mugv.run.config import dataclass_from, model_config_from
from mugv.training import ObjectiveConfig, OptimConfig


@pytest.mark.parametrize("stage", sorted(mugv_10b.STAGES))
def test_10b_stage_configs_are_complete(stage):
    c = mugv_10b.get_config(stage)
    model = model_config_from(c)
    assert model.hidden_size == 3456 and model.depth == 56
    dataclass_from(OptimConfig, c.optim)
    dataclass_from(ObjectiveConfig, c.objective)
    assert c.data.text_len <= model.max_text_tokens
    for frames, h, w, batch in c.data.buckets:
        assert frames >= 1 and h >= 2 and w >= 2 and batch >= 1
    if stage == "sft":
        assert c.optim.schedule == "cosine"


def test_unknown_stage_and_fields_are_named():
    with pytest.raises(ValueError, match="unknown stage 'video_9000'"):
        mugv_10b.get_config("video_9000")
    c = tiny.get_config()
    c.optim.unlock()
    c.optim.learning_rat = 1.0
    with pytest.raises(ValueError, match="learning_rat"):
        dataclass_from(OptimConfig, c.optim)
    with pytest.raises(ValueError, match="unknown argument"):
        tiny.get_config("nonsense")


@pytest.mark.parametrize("module,name", [(vae_tiny, "configs/vae_tiny.py"), (vae_release, "configs/vae_release.py")])
def test_vae_configs_share_the_final_stage(module, name):
    first, final = module.get_config(), module.get_config("final")
    assert not first.freeze_spatial and first.loss.gan == 0.0 and first.loss.saliency_start_step == -1
    assert final.freeze_spatial and final.loss.gan == 0.05 and final.loss.saliency_start_step == 0
    # The stage changes those fields only; the preset's own settings stay.
    assert final.vae_preset == first.vae_preset and final.num_steps == first.num_steps
    with pytest.raises(ValueError, match=f"{name}: unknown argument 'nonsense'"):
        module.get_config("nonsense")


@pytest.mark.parametrize("pod", sorted(mugv_10b.LORA_PODS))
@pytest.mark.parametrize("stage", sorted(mugv_10b.LORA_STAGES))
def test_10b_lora_stages_fit_a_small_slice_with_the_reference_adapters(stage, pod):
    from mugv.run.config import as_run_config, check_batch_split

    run = as_run_config(mugv_10b.get_config(f"{stage}:{pod}@/ckpt"))
    # The reference trainer's --lora: rank 64, alpha 32 (scale 0.5), every block linear; the base in bf16.
    assert (run.lora.rank, run.lora.scale, run.lora.base_dtype) == (64, 0.5, "bfloat16")
    assert len(run.lora.sites()) == 7 and run.model_config.hidden_size == 3456
    assert run.init_from == "release:/ckpt/dit.pt" and run.compute_dtype == "bfloat16"
    mesh = run.mesh.ici.as_dict()
    assert mesh["data"] * mesh["fsdp"] * mesh["tensor"] * mesh["context"] == mugv_10b.LORA_PODS[pod]["devices"]
    assert run.target.name == pod and ("+" in run.attention) == (mesh["context"] > 1)
    assert run.attention.split("+")[0] == ("cudnn" if pod.startswith("h100") else "splash")
    for b in run.data.buckets:
        check_batch_split(b[3], run.optim.grad_accum_steps, mesh)


def test_lora_stages_and_curriculum_stages_keep_to_their_pods():
    assert mugv_10b.get_config("lora_720").target.name == mugv_10b.LORA_DEFAULT_POD == "h100x8"
    with pytest.raises(ValueError, match=r"LoRA stages: choose from \['h100x8', 'v5p-16', 'v6e-16'\]"):
        mugv_10b.get_config("lora_720:h100x64")
    with pytest.raises(ValueError, match="no LAYOUTS entry for 720p_5s on pod 'v5p-16'"):
        mugv_10b.get_config("video_720:v5p-16")
    assert mugv_10b.pod_devices("h100x8") == 8 and mugv_10b.pod_devices("v6e-16") == 16
