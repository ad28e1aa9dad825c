"""SimMIM's own ViT (official config: no absolute position table, one relative position bias shared by all blocks,
q/v biases, layer scale 0.1) as `model.position=shared_relative` over timm's Beit: official release files load into
SimMIM and into Vision ELECTRA's discriminator with every tensor equal to the file's, the export is a plain timm
model, and the VE continual pre-training recipe starts D from SimMIM as the paper does (Sec. 4)."""
import pytest
import torch

from mimkit.config import ConfigError, load_config
from mimkit.engine.trainer import Trainer, load_init
from mimkit.eval.attention import cls_attention
from mimkit.methods import build_method
from tests.conftest import REPO, assert_export_is_the_result, metrics_rows

D, DEPTH, HEADS, PATCH, GRID, CHANS = 64, 4, 4, 4, (7, 7), 1
SIMMIM_REL = ["method.name=simmim", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
              "method.mask_patch_size=4", "model.position=shared_relative"]


def official_relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """SimMIM's RelativePositionBias.relative_position_index (models/vision_transformer.py), written out."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += grid[0] - 1
    rel[:, :, 1] += grid[1] - 1
    rel[:, :, 0] *= 2 * grid[1] - 1
    num = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    index = torch.zeros((grid[0] * grid[1] + 1,) * 2, dtype=rel.dtype)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:], index[0:, 0], index[0, 0] = num - 3, num - 2, num - 1
    return index


def official_simmim_vit_file(path, decoder: bool = True) -> dict:
    """`{'model': state_dict}` of SimMIM(VisionTransformerForSimMIM) with USE_APE False and USE_SHARED_RPB True."""
    torch.manual_seed(11)
    num_rel = (2 * GRID[0] - 1) * (2 * GRID[1] - 1) + 3
    shapes = {"encoder.cls_token": [1, 1, D], "encoder.mask_token": [1, 1, D],
              "encoder.patch_embed.proj.weight": [D, CHANS, PATCH, PATCH], "encoder.patch_embed.proj.bias": [D],
              "encoder.rel_pos_bias.relative_position_bias_table": [num_rel, HEADS],
              "encoder.norm.weight": [D], "encoder.norm.bias": [D]}
    for i in range(DEPTH):
        p = f"encoder.blocks.{i}."
        shapes.update({f"{p}norm1.weight": [D], f"{p}norm1.bias": [D], f"{p}attn.qkv.weight": [3 * D, D],
                       f"{p}attn.q_bias": [D], f"{p}attn.v_bias": [D], f"{p}attn.proj.weight": [D, D],
                       f"{p}attn.proj.bias": [D], f"{p}norm2.weight": [D], f"{p}norm2.bias": [D],
                       f"{p}mlp.fc1.weight": [4 * D, D], f"{p}mlp.fc1.bias": [4 * D], f"{p}mlp.fc2.weight": [D, 4 * D],
                       f"{p}mlp.fc2.bias": [D], f"{p}gamma_1": [D], f"{p}gamma_2": [D]})
    if decoder:                                              # Conv2d(D, stride^2 * C, 1) + PixelShuffle(stride)
        shapes.update({"decoder.0.weight": [PATCH ** 2 * CHANS, D, 1, 1], "decoder.0.bias": [PATCH ** 2 * CHANS]})
    sd = {k: torch.randn(shape) for k, shape in shapes.items()}
    sd["encoder.rel_pos_bias.relative_position_index"] = official_relative_position_index(GRID)
    torch.save({"model": sd}, path)
    return sd


def assert_encoder_equals_file(backbone, sd: dict) -> int:
    """Every tensor of the Beit encoder equals the file's `encoder.*` tensor of the same name; returns the count."""
    own = backbone.model.state_dict()
    for key, value in own.items():
        assert torch.equal(value, sd[f"encoder.{key}"]), key
    assert set(f"encoder.{k}" for k in own) == {k for k in sd if k.startswith("encoder.")} - {
        "encoder.mask_token", "encoder.rel_pos_bias.relative_position_index"}
    return len(own)


def test_the_shared_bias_indexing_is_simmims():
    method = build_method(load_config(None, SIMMIM_REL), CHANS)
    bias = method.backbone.model.rel_pos_bias
    assert torch.equal(bias.relative_position_index, official_relative_position_index(GRID))
    assert method.backbone.model.pos_embed is None and len(method.backbone.model.blocks[0].gamma_1) == D


def test_official_simmim_vit_loads_into_simmim(tmp_path):
    sd = official_simmim_vit_file(tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth")
    method = build_method(load_config(None, SIMMIM_REL), CHANS)
    report = load_init(method, tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth")
    n = assert_encoder_equals_file(method.backbone, sd)
    assert f"encoder: {n + 1}/{n + 1} tensors loaded" in report and "decoder: 2/2 tensors loaded" in report, report
    assert torch.equal(method.backbone.mask_token, sd["encoder.mask_token"])
    assert torch.equal(method.decoder[0].weight, sd["decoder.0.weight"])


def test_official_simmim_vit_loads_into_vision_electras_discriminator(tmp_path):
    sd = official_simmim_vit_file(tmp_path / "simmim.pth", decoder=False)
    cfg = load_config(None, ["method.name=vision_electra", "model.size=pico", "model.img_size=[28,28]",
                             "model.patch_size=4", "model.position=shared_relative", "method.decoder_dim=32",
                             "method.decoder_depth=1", "method.decoder_heads=2",
                             f"method.discriminator_init={tmp_path / 'simmim.pth'}"])
    method = build_method(cfg, CHANS)
    assert cfg.method["discriminator_layer_scale"] == 0.1                         # auto: the file has gamma_1/2
    report = " ".join(method.load_initial_weights())
    n = assert_encoder_equals_file(method.discriminator.backbone, sd)
    assert f"discriminator encoder: {n}/{n} tensors loaded" in report, report
    assert method.generator.encoder.model.pos_embed is not None                  # G's MAE encoder: absolute positions


def test_an_absolute_vit_is_told_to_use_shared_relative(tmp_path):
    official_simmim_vit_file(tmp_path / "simmim.pth")
    method = build_method(load_config(None, SIMMIM_REL[:-1]), CHANS)
    from mimkit.methods.base import CheckpointMismatch
    with pytest.raises(CheckpointMismatch, match="model.position=shared_relative"):
        load_init(method, tmp_path / "simmim.pth")
    with pytest.raises(ConfigError, match="mae encodes the visible patches only: set model.position=absolute"):
        load_config(None, ["method.name=mae", "model.position=shared_relative"])


def test_tiny_run_trains_exports_a_timm_beit_and_draws_attention(fmnist_small, tmp_path):
    from tests.conftest import tiny_config
    cfg = tiny_config(fmnist_small, "simmim", ["model.position=shared_relative", "train.steps=3"])
    trainer = Trainer(cfg, tmp_path / "run")
    table = trainer.method.backbone.model.rel_pos_bias.relative_position_bias_table
    before = table.detach().clone()
    trainer.train()
    assert not torch.equal(before, table) and metrics_rows(tmp_path / "run")[-1]["step"] == 3   # the bias trains
    assert_export_is_the_result(tmp_path / "run/last.pt", tmp_path / "enc")      # strict timm load, same features
    import json
    meta = json.loads((tmp_path / "enc.json").read_text())
    assert meta["model_name"].startswith("beit") and meta["kwargs"]["use_shared_rel_pos_bias"]
    model = trainer.method.backbone.model.eval()
    maps = cls_attention(model, torch.randn(2, 1, 28, 28))
    assert maps.shape == (2, HEADS, 49) and torch.all(maps.sum(-1) < 1) and torch.all(maps.sum(-1) > 0)


def test_vision_electra_official_recipe_starts_d_from_simmim(tmp_path):
    from tests.test_export import official_mae_state_dict
    torch.save({"model": official_mae_state_dict(True)}, tmp_path / "mae_visualize_vit_base.pth")
    sd = official_simmim_vit_file(tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth", decoder=False)
    recipe = REPO / "configs/vision-electra_vit-b16_in1k-official+50e.yaml"
    shipped = load_config(recipe)
    assert "simmim" in shipped.method["discriminator_init"] and shipped.model.position == "shared_relative"
    cfg = load_config(recipe, ["model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
                               "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
                               f"method.generator_init={tmp_path / 'mae_visualize_vit_base.pth'}",
                               f"method.discriminator_init={tmp_path / 'simmim_pretrain__vit_base__img224__800ep.pth'}"])
    method = build_method(cfg, CHANS)
    method.load_initial_weights()
    assert_encoder_equals_file(method.discriminator.backbone, sd)
