from pathlib import Path

import pytest

from mimkit.config import ConfigError, load_config
from tests.conftest import REPO


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_loads(recipe):
    cfg = load_config(REPO / "configs" / recipe)
    assert cfg.method["name"].replace("_", "-") in recipe


def test_paper_settings_in_vit_b_recipes():
    mae = load_config(REPO / "configs/mae_vit-b16_in1k-800e.yaml")
    assert mae.method["mask_ratio"] == 0.75 and mae.method["decoder_depth"] == 8 and mae.method["decoder_dim"] == 512
    assert mae.optim.base_lr == 1.5e-4 and mae.optim.betas == [0.9, 0.95] and mae.optim.warmup_epochs == 40
    sim = load_config(REPO / "configs/simmim_vit-b16_in1k-800e.yaml")
    assert sim.method["mask_ratio"] == 0.6 and sim.method["mask_patch_size"] == 32


@pytest.mark.parametrize("override,nearest", [("train.stpes=3", "train.steps"), ("optim.base_rl=1", "optim.base_lr"),
                                              ("method.mask_ratoi=0.5", "method.mask_ratio"),
                                              ("method.nam=mae", "method.name")])
def test_unknown_key_names_the_nearest(override, nearest):
    with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
        load_config(None, [override])


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=12", "model.img_size=[28,32]", "model.patch_size=4", "train.compile=true",
                             "optim.clip_grad=null"])
    assert cfg.train.steps == 12 and cfg.model.img_size == [28, 32] and cfg.train.compile is True
    assert cfg.optim.clip_grad is None


def test_bad_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Path("configs/nope.yaml"))
