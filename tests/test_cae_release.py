"""An Atten4Vis/CAE release file into any CAE run or probe. The file is built here from the official key names and
shapes (models/modeling_cae.py and modeling_cae_helper.py of Atten4Vis/CAE), written out below, never by renaming
mimkit's own state dict back."""
import json
import math

import pytest
import torch

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.trainer import load_init
from mimkit.methods import build_method
from tests.conftest import REPO

D, DEPTH, DD, REG_DEPTH, DEC_DEPTH, VOCAB, PATCH, CHANS, GRID = 32, 2, 48, 2, 2, 8192, 4, 1, (7, 7)


def official_sincos(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """VisionTransformerEncoder.build_2d_sincos_position_embedding (with the zero CLS row)."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid[1], dtype=torch.float32), torch.arange(grid[0], dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], 1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def beit_block(prefix: str, dim: int) -> dict:
    """modeling_cae_helper.Block: Attention (qkv without bias, q_bias / v_bias), Mlp fc1 / fc2, gamma_1 / gamma_2."""
    return {f"{prefix}norm1.weight": [dim], f"{prefix}norm1.bias": [dim], f"{prefix}attn.q_bias": [dim],
            f"{prefix}attn.v_bias": [dim], f"{prefix}attn.qkv.weight": [3 * dim, dim], f"{prefix}attn.proj.weight": [dim, dim],
            f"{prefix}attn.proj.bias": [dim], f"{prefix}norm2.weight": [dim], f"{prefix}norm2.bias": [dim],
            f"{prefix}mlp.fc1.weight": [4 * dim, dim], f"{prefix}mlp.fc1.bias": [4 * dim],
            f"{prefix}mlp.fc2.weight": [dim, 4 * dim], f"{prefix}mlp.fc2.bias": [dim],
            f"{prefix}gamma_1": [dim], f"{prefix}gamma_2": [dim]}


def official_shapes() -> dict:
    encoder = {"cls_token": [1, 1, D], "patch_embed.proj.weight": [D, CHANS, PATCH, PATCH], "patch_embed.proj.bias": [D],
               "norm.weight": [D], "norm.bias": [D]}
    for i in range(DEPTH):
        encoder.update(beit_block(f"blocks.{i}.", D))
    shapes = {f"{branch}.{k}": v for branch in ("encoder", "alignment_encoder") for k, v in encoder.items()}
    shapes.update({"encoder_to_regresser.weight": [DD, D], "encoder_to_regresser.bias": [DD],
                   "encoder_to_regresser_norm.weight": [DD], "encoder_to_regresser_norm.bias": [DD],
                   "mask_token": [1, 1, DD], "regresser.norm.weight": [DD], "regresser.norm.bias": [DD],
                   "decoder.norm.weight": [DD], "decoder.norm.bias": [DD], "decoder.head.weight": [VOCAB, DD],
                   "decoder.head.bias": [VOCAB]})
    for i in range(REG_DEPTH):                                             # RegressorBlock + CrossAttention
        p = f"regresser.regressor_blocks.{i}."
        for norm in ("norm1_q", "norm1_k", "norm1_v", "norm2_cross"):
            shapes.update({f"{p}{norm}.weight": [DD], f"{p}{norm}.bias": [DD]})
        shapes.update({f"{p}cross_attn.{x}.weight": [DD, DD] for x in ("q", "k", "v", "proj")})
        shapes.update({f"{p}cross_attn.q_bias": [DD], f"{p}cross_attn.v_bias": [DD], f"{p}cross_attn.proj.bias": [DD],
                       f"{p}mlp_cross.fc1.weight": [4 * DD, DD], f"{p}mlp_cross.fc1.bias": [4 * DD],
                       f"{p}mlp_cross.fc2.weight": [DD, 4 * DD], f"{p}mlp_cross.fc2.bias": [DD],
                       f"{p}gamma_1_cross": [DD], f"{p}gamma_2_cross": [DD]})
    for i in range(DEC_DEPTH):
        shapes.update(beit_block(f"decoder.decoder_blocks.{i}.", DD))
    return shapes


def official_file(path) -> dict:
    torch.manual_seed(4)
    sd = {k: torch.randn(shape) for k, shape in official_shapes().items()}
    for branch in ("encoder", "alignment_encoder"):
        sd[f"{branch}.pos_embed"] = official_sincos(D, GRID)            # fixed, not learnt
    sd["rd_pos_embed"] = official_sincos(DD, GRID)
    torch.save({"model": sd}, path)
    return sd


def expected_mimkit_tensor(key: str, sd: dict) -> torch.Tensor | None:
    """The file's tensor that mimkit's `key` must equal (None: not in the file)."""
    if key.endswith("attn.qkv.bias"):                                     # q | zero k bias | v
        base = key[:-len("qkv.bias")]
        q, v = sd[official_name(base + "q_bias")], sd[official_name(base + "v_bias")]
        return torch.cat([q, torch.zeros_like(q), v])
    return sd.get(official_name(key))


def official_name(key: str) -> str:
    rules = [("encoder.model.", "encoder."), ("encoder_to_regressor.0.", "encoder_to_regresser."),
             ("encoder_to_regressor.1.", "encoder_to_regresser_norm."), ("regressor.blocks.", "regresser.regressor_blocks."),
             ("regressor.norm.", "regresser.norm."), ("decoder.blocks.", "decoder.decoder_blocks.")]
    for ours, theirs in rules:
        if key.startswith(ours):
            key = theirs + key[len(ours):]
            break
    return key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")


CAE_SMALL = ["method.name=cae", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.img_size=[28,28]",
             "model.patch_size=4", f"method.decoder_dim={DD}", "method.decoder_heads=2", f"method.regressor_depth={REG_DEPTH}",
             f"method.decoder_depth={DEC_DEPTH}"]


def test_official_file_loads_into_a_pixel_target_cae_with_the_head_left_at_init(tmp_path):
    sd = official_file(tmp_path / "cae_base_1600ep.pth")
    torch.manual_seed(0)
    method = build_method(load_config(None, CAE_SMALL + ["method.target=pixels"]), CHANS)
    head_before = method.decoder.head.weight.detach().clone()
    report = load_init(method, tmp_path / "cae_base_1600ep.pth")
    n_enc = len(method.encoder.state_dict())
    n_reg = len([k for k in method.state_dict() if k.startswith(("regressor.", "mask_token", "encoder_to_regressor."))])
    n_dec = len([k for k in method.state_dict() if k.startswith("decoder.")])
    assert f"encoder: {n_enc}/{n_enc} tensors loaded" in report, report
    assert f"regressor: {n_reg}/{n_reg} tensors loaded" in report, report
    assert (f"decoder: {n_dec - 2}/{n_dec} tensors loaded, left at init (another shape in the file): decoder.head.weight "
            f"[{VOCAB}, {DD}] there, [16, {DD}] here, decoder.head.bias [{VOCAB}] there, [16] here") in report, report
    loaded = 0
    for key, value in method.state_dict().items():
        if key.startswith("decoder.head."):
            continue
        expected = expected_mimkit_tensor(key, sd)
        if key in ("encoder.model.pos_embed", "rd_pos_embed"):            # fixed tables: the same values
            assert torch.allclose(value, expected, atol=1e-5), key
            continue
        assert expected is not None, f"{key} has no tensor in the file"
        assert torch.equal(value, expected), key
        loaded += 1
    assert loaded == len(method.state_dict()) - 4 and torch.equal(method.decoder.head.weight, head_before)
    assert not method.encoder.model.pos_embed.requires_grad


def test_token_target_cae_with_another_vocabulary_loads_the_rest(tmp_path, tiny_tokenizer):
    official_file(tmp_path / "cae.pth")
    method = build_method(load_config(None, CAE_SMALL + [f"tokenizer.path={tiny_tokenizer}"]), CHANS)
    report = load_init(method, tmp_path / "cae.pth")
    assert f"decoder.head.weight [{VOCAB}, {DD}] there, [64, {DD}] here" in report, report


def test_probe_the_official_file_with_the_in1k_recipe(tmp_path, fmnist_small, capsys):
    """`mimkit eval linear --config configs/cae_vit-b16_in1k-1600e.yaml --init FILE`: no tokenizer file is needed
    (the recipe's runs/tokenizer-in1k/last.pt does not exist here) and the encoder is the file's."""
    official_file(tmp_path / "cae_base_1600ep.pth")
    recipe = str(REPO / "configs/cae_vit-b16_in1k-1600e.yaml")
    assert main(["eval", "linear", "--config", recipe, "--init", str(tmp_path / "cae_base_1600ep.pth"), "--data",
                 f"idx:{fmnist_small}", "--train-limit", "200", "--test-limit", "100", "--epochs", "2",
                 *CAE_SMALL[1:]]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "encoder: " in result["encoder"] and "tensors loaded" in result["encoder"] and result["feature_dim"] == D
    assert math.isfinite(result["top1"])


def test_a_file_of_another_width_is_still_one_sentence(tmp_path):
    official_file(tmp_path / "cae.pth")
    method = build_method(load_config(None, [o.replace("embed_dim=32", "embed_dim=64") for o in CAE_SMALL]
                                      + ["method.target=pixels"]), CHANS)
    from mimkit.methods.base import CheckpointMismatch
    with pytest.raises(CheckpointMismatch, match="set model.size / model.embed_dim"):
        load_init(method, tmp_path / "cae.pth")
