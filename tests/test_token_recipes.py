"""The ImageNet recipes of CAE and CIM with DALL-E's tokenizer: fed the size whose token grid is the grid the method
predicts on (112 px under a 224 px ViT-B/16, as BEiT, CAE and CIM do), 14x14 tokens, the papers' mask counts, one
training step each. The tokenizer has DALL-E's shape (4 groups, down-sampling 8, 8192 codes, no input size of its
own) with random weights and a reduced width; the encoders' width is reduced so a step runs on a CPU."""
from pathlib import Path

import pytest
import torch

from mimkit.config import load_config
from mimkit.engine.checkpoint import load_checkpoint
from mimkit.engine.trainer import Trainer
from mimkit.tokenizers import DiscreteVAE, save_tokenizer
from tests.conftest import REPO, metrics_rows

CAE_RECIPES = sorted(p.name for p in (REPO / "configs").glob("cae_vit-*_in1k-*.yaml"))
CIM_RECIPES = sorted(p.name for p in (REPO / "configs").glob("cim-*_in1k-300e.yaml"))
NARROW_VIT = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
CPU_RUN = ["data.spec=synthetic:3x224x224", "data.batch_size=2", "data.num_workers=0", "train.accum_steps=1",
           "train.steps=1", "train.log_every=1", "train.sample_every=0", "train.precision=fp32"]


@pytest.fixture(scope="module")
def dalle_shaped(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dalle") / "dalle.safetensors"
    save_tokenizer(DiscreteVAE(3, 8192, 16, 16, groups=4, blocks_per_group=1, img_size=None), path)
    return path


def narrowed(recipe: str, tokenizer: Path) -> list[str]:
    extra = [f"tokenizer.path={tokenizer}", *CPU_RUN]
    if recipe.startswith("cae"):
        return extra + NARROW_VIT + ["method.decoder_dim=32", "method.decoder_heads=2", "method.regressor_depth=1",
                                     "method.decoder_depth=1"]
    if "resnet50" in recipe:
        return extra + ["method.generator_width=32", "method.generator_heads=2"]
    return extra + NARROW_VIT


def test_the_recipes_are_all_here():
    assert len(CAE_RECIPES) == 9 and len(CIM_RECIPES) == 6


@pytest.mark.parametrize("recipe", CAE_RECIPES + CIM_RECIPES)
def test_in1k_recipe_feeds_dalle_112px_and_trains_a_step(recipe, dalle_shaped, tmp_path, capsys):
    cfg = load_config(REPO / "configs" / recipe, narrowed(recipe, dalle_shaped))
    trainer = Trainer(cfg, tmp_path / "run")
    method = trainer.method
    assert method.tokenizer_size == (112, 112) and method.tokenizer_grid == (14, 14)
    images = torch.randn(4, 3, 224, 224)
    assert method.token_ids(images).shape == (4, 196)
    counts = method.mask(images).sum(1)
    if recipe.startswith("cae"):
        assert counts.tolist() == [98] * 4                                       # CAE Sec. 3.2
    else:
        assert method.token_grid == (14, 14) and counts.min() >= 100 and counts.max() <= 120   # CIM A.3
    trainer.train()
    assert "fed 112x112 px -> 14x14 tokens" in capsys.readouterr().out
    assert metrics_rows(tmp_path / "run")[-1]["step"] == 1
    frozen = load_checkpoint(tmp_path / "run" / "last.pt")["frozen"]["tokenizer"]
    assert frozen["input_size"] == [112, 112] and frozen["token_grid"] == [14, 14] and len(frozen["sha256"]) == 64


def test_an_explicit_input_size_wins_and_a_wrong_one_is_one_sentence(dalle_shaped):
    from mimkit.methods import build_method
    base = narrowed("cae_vit-b16_in1k-1600e.yaml", dalle_shaped)
    recipe = REPO / "configs" / "cae_vit-b16_in1k-1600e.yaml"
    method = build_method(load_config(recipe, base + ["model.img_size=[112,112]", "model.patch_size=8",
                                                      "tokenizer.input_size=[112,112]"]), 3)
    assert method.tokenizer_size == (112, 112) and method.tokenizer_grid == (14, 14)
    with pytest.raises(ValueError, match=r"28x28 token grid at tokenizer.input_size=\[224, 224\].*"
                                         r"set tokenizer.input_size=\[112,112\]"):
        build_method(load_config(recipe, base + ["tokenizer.input_size=224"]), 3)
