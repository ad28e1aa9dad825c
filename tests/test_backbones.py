import math

import torch

from mimkit.backbones import SwinBackbone, ViTBackbone, sincos_pos_embed_2d
from mimkit.masking import random_mask, visible_indices


def vit(**kw):
    torch.manual_seed(0)
    return ViTBackbone((28, 36), 4, 2, size="pico", **kw).eval()


def test_sincos_pos_embed_hand_values():
    emb = sincos_pos_embed_2d(8, (2, 3), cls_token=True)
    assert emb.shape == (1, 7, 8) and emb[0, 0].eq(0).all()
    # patch (row 1, col 2): x half uses col 2, y half uses row 1; omega = [1, 1/100]
    p = emb[0, 1 + 1 * 3 + 2]
    expect = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
              math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    assert torch.allclose(p, torch.tensor(expect), atol=1e-6)


def test_visible_encoding_with_nothing_masked_equals_timm_forward():
    model = vit()
    x = torch.randn(2, 2, 28, 36)
    ids = torch.arange(model.num_patches).expand(2, -1)
    assert torch.allclose(model.forward_visible(x, ids), model.forward_features(x), atol=1e-5)


def test_visible_encoding_ignores_masked_pixels():
    model = vit()
    torch.manual_seed(1)
    x = torch.randn(2, 2, 28, 36)
    mask = random_mask(2, model.grid, 0.75, "cpu")
    ids = visible_indices(mask, model.num_patches - int(mask[0].sum()))
    y = x.clone()
    pix = mask.reshape(2, 1, 7, 9).repeat_interleave(4, 2).repeat_interleave(4, 3)
    y[pix.expand_as(y)] = 100.0
    assert torch.allclose(model.forward_visible(x, ids), model.forward_visible(y, ids), atol=1e-5)


def test_mask_token_encoding_ignores_masked_pixels_and_returns_all_tokens():
    model = vit(mask_token=True)
    x = torch.randn(2, 2, 28, 36)
    mask = random_mask(2, model.grid, 0.5, "cpu")
    y = x.clone()
    pix = mask.reshape(2, 1, 7, 9).repeat_interleave(4, 2).repeat_interleave(4, 3)
    y[pix.expand_as(y)] = -50.0
    out = model.forward_masked(x, mask)
    assert out.shape == (2, 1 + 63, model.embed_dim)
    assert torch.allclose(out, model.forward_masked(y, mask), atol=1e-5)
    assert not torch.allclose(out, model.forward_masked(x, None), atol=1e-3)


def test_intermediate_features():
    model = vit(mask_token=True)
    x = torch.randn(1, 2, 28, 36)
    out, feats = model.forward_masked(x, None, return_layers=[0, 3])
    assert len(feats) == 2 and feats[0].shape == out.shape
    assert torch.allclose(model.model.norm(feats[1]), out, atol=1e-5)   # last block's output, before the norm
    _, visible_feats = model.forward_visible(x, torch.arange(63)[None], return_layers=[1])
    assert visible_feats[0].shape == (1, 64, model.embed_dim)


def test_swin_mask_token_after_patch_embedding():
    torch.manual_seed(0)
    model = SwinBackbone((28, 28), 2, 1, size="pico", window_size=7).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(model.forward_masked(x, None), model.forward_features(x).permute(0, 3, 1, 2), atol=1e-5)
    mask = random_mask(2, model.grid, 0.5, "cpu")
    y = x.clone()
    pix = mask.reshape(2, 1, 14, 14).repeat_interleave(2, 2).repeat_interleave(2, 3)
    y[pix] = 9.0
    out = model.forward_masked(x, mask)
    assert out.shape == (2, model.embed_dim, 7, 7)
    assert torch.allclose(out, model.forward_masked(y, mask), atol=1e-5)
