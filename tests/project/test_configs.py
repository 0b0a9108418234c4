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
