import pytest
import torch

from mimkit.config import load_config
from mimkit.losses import masked_mse
from mimkit.methods import build_method
from mimkit.patches import patchify
from tests.conftest import MAE_PICO, SIMMIM_PICO


def test_mae_loss_is_masked_mse_on_norm_pix_target(monkeypatch):
    cfg = load_config(None, MAE_PICO)
    torch.manual_seed(0)
    mae = build_method(cfg, 1)
    x = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, :37] = True
    monkeypatch.setattr(mae.generator, "mask", lambda images: mask)
    out = mae(x)
    pred = mae.generator(x, mask)
    target = patchify(x, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(out["loss"], per_patch[:, :37].mean(), atol=1e-5)
    assert torch.allclose(out["loss"], masked_mse(pred, target, mask), atol=1e-6)


def test_mae_gradients_reach_encoder_and_decoder_not_fixed_pos_embeds():
    mae = build_method(load_config(None, MAE_PICO), 1)
    mae(torch.randn(2, 1, 28, 28))["loss"].backward()
    no_grad = {n for n, p in mae.named_parameters() if p.grad is None}
    assert no_grad == {"generator.decoder_pos_embed", "generator.encoder.model.pos_embed"}
    assert mae.generator.encoder.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_simmim_loss_only_counts_masked_pixels(monkeypatch):
    sim = build_method(load_config(None, SIMMIM_PICO), 1)
    x = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, ::2] = True
    monkeypatch.setattr(sim, "mask", lambda images: mask)
    recon = sim.reconstruct(x, mask)
    pix = mask.reshape(2, 1, 7, 7).repeat_interleave(4, 2).repeat_interleave(4, 3)
    expected = (recon - x).abs()[pix].mean()
    assert torch.allclose(sim(x)["loss"], expected, atol=1e-4)


@pytest.mark.parametrize("overrides,chans,size", [
    (MAE_PICO + ["model.img_size=[28,36]"], 3, (28, 36)),
    (SIMMIM_PICO + ["model.img_size=[32,48]", "method.mask_patch_size=8"], 5, (32, 48)),
    (SIMMIM_PICO + ["model.arch=swin", "model.patch_size=2", "model.window_size=7"], 1, (28, 28)),
])
def test_methods_run_on_non_square_many_channel_images(overrides, chans, size):
    method = build_method(load_config(None, overrides), chans)
    x = torch.randn(2, chans, *size)
    out = method(x)
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    rows = method.reconstruction_rows(x)
    assert [name for name, _ in rows] == ["original", "masked", "reconstruction"]
    assert all(r.shape == x.shape for _, r in rows)


def test_mae_needs_vit():
    with pytest.raises(ValueError, match="model.arch=vit"):
        build_method(load_config(None, MAE_PICO + ["model.arch=swin", "model.patch_size=2"]), 1)
