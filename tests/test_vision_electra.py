"""Vision ELECTRA: Eq. 1-5 against hand-computed values, gradient paths, ablation switches, training."""
import json

import pytest
import torch
from torch import nn

from mimkit.config import load_config
from mimkit.engine.checkpoint import load_checkpoint
from mimkit.engine.trainer import Trainer
from mimkit.methods import build_method
from mimkit.patches import patchify, unpatchify
from tests.conftest import assert_export_is_the_result, tiny_config

VE_PICO = ["method.name=vision_electra", "model.size=pico", "model.img_size=[8,8]", "model.patch_size=4",
           "method.decoder_dim=16", "method.decoder_depth=1", "method.decoder_heads=2"]
VE_PICO_SIMMIM = [o for o in VE_PICO if not o.startswith("method.decoder_")]   # SimMIM's G has a one-layer head
VE_TINY = ["method.name=vision_electra", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


class StubDiscriminator(nn.Module):
    """Logits that are simple functions of the image, with one parameter so functional_call has work to do;
    a level whose head is switched off returns None, as the real discriminator."""

    def __init__(self, patch=True, image=True):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.patch, self.image = patch, image

    def forward(self, images):
        return (self.scale * patchify(images, 4).mean(-1) if self.patch else None,
                self.scale * images.mean((1, 2, 3)) if self.image else None)


def log_sigmoid(x):
    return torch.log(1 / (1 + torch.exp(-x)))


def hand_losses(images, pred, mask):
    """Eq. 1-4 written out from the paper with the stub's logits."""
    real = patchify(images, 4)
    b, n = mask.shape
    m = mask.float()
    loss_img = (((pred - real) ** 2).mean(-1) * m).sum() / m.sum()                                  # Eq. 1
    fake = unpatchify(torch.where(mask[..., None], pred, real), 4, (2, 2), 1)
    lp_real, lp_fake = real.mean(-1), patchify(fake, 4).mean(-1)
    y_fake = 1 - m
    loss_patch = -(log_sigmoid(lp_real).sum() + (y_fake * log_sigmoid(lp_fake) + (1 - y_fake) * log_sigmoid(-lp_fake)).sum()) / (2 * b * n)  # Eq. 3
    lc_real, lc_fake = images.mean((1, 2, 3)), fake.mean((1, 2, 3))
    loss_cls = -(log_sigmoid(lc_real).sum() + log_sigmoid(-lc_fake).sum()) / (2 * b)              # Eq. 4
    gan_micro = (-(log_sigmoid(lp_fake) * m).sum(1) / m.sum(1)).mean()                            # Eq. 2, patches
    gan_macro = (-log_sigmoid(lc_fake)).mean()                                                     # Eq. 2, image
    return loss_img, gan_micro + gan_macro, loss_patch, loss_cls, gan_micro, gan_macro


def ve_with_stubs(monkeypatch, overrides=()):
    torch.manual_seed(0)
    ve = build_method(load_config(None, VE_PICO + list(overrides)), 1)
    ve.discriminator = StubDiscriminator(ve.opts.patch_loss, ve.opts.cls_loss)
    images = torch.randn(3, 1, 8, 8)
    mask = torch.tensor([[True, False, True, False], [True, True, False, False], [False, True, True, True]])
    pred = torch.randn(3, 4, 16)
    monkeypatch.setattr(ve, "mask", lambda x: mask)
    monkeypatch.setattr(ve, "generate", lambda x, m, noise: pred)
    return ve, images, pred, mask


def test_equations_1_to_5_match_hand_computation(monkeypatch):
    ve, images, pred, mask = ve_with_stubs(monkeypatch)
    out = ve(images)
    img, gan, patch, cls, _, _ = hand_losses(images, pred, mask)
    parts = out["parts"]
    for name, value in (("loss_img", img), ("loss_gan", gan), ("loss_patch", patch), ("loss_cls", cls)):
        assert torch.allclose(parts[name], value, atol=1e-5), (name, parts[name], value)
    assert torch.allclose(out["loss"], img + 0.2 * gan + patch + cls, atol=1e-5)                 # Eq. 5, lambda 0.2


@pytest.mark.parametrize("switch,kept,head", [
    ("method.patch_loss=false", {"loss_img", "loss_cls", "loss_gan", "acc_img_original", "acc_img_reconstructed"}, "patch_head"),
    ("method.cls_loss=false", {"loss_img", "loss_patch", "loss_gan", "acc_patch_original", "acc_patch_visible_in_reconstruction",
                                  "acc_patch_generated"}, "image_head"),
])
def test_ablation_removes_a_whole_level(monkeypatch, switch, kept, head):
    """Table 3 "w/o patch loss" (Sec. 4.3: D solely appraises the whole image): no Eq. 3 and no micro part of
    Eq. 2, nothing patch-level computed or logged, no patch head; "w/o CLS loss" the same for the image level."""
    ve, images, pred, mask = ve_with_stubs(monkeypatch, [switch])
    img, _, patch, cls, gan_micro, gan_macro = hand_losses(images, pred, mask)
    out = ve(images)
    assert set(out["parts"]) == kept
    gan, d_term = (gan_macro, cls) if "patch_loss" in switch else (gan_micro, patch)
    assert torch.allclose(out["parts"]["loss_gan"], gan, atol=1e-5)
    assert torch.allclose(out["loss"], img + 0.2 * gan + d_term, atol=1e-5)
    assert getattr(build_method(load_config(None, VE_PICO + [switch]), 1).discriminator, head) is None


def test_ablation_without_gan_loss(monkeypatch):
    ve, images, pred, mask = ve_with_stubs(monkeypatch, ["method.gan_loss=false"])
    img, _, patch, cls, _, _ = hand_losses(images, pred, mask)
    out = ve(images)
    assert "loss_gan" not in out["parts"]
    assert torch.allclose(out["loss"], img + patch + cls, atol=1e-5)


def test_both_levels_off_is_an_error():
    with pytest.raises(ValueError, match="nothing to learn"):
        build_method(load_config(None, VE_PICO + ["method.patch_loss=false", "method.cls_loss=false"]), 1)


def test_simmim_generator_defaults_to_simmim_mask_ratio():
    ve = build_method(load_config(None, VE_PICO_SIMMIM + ["method.generator=simmim", "method.mask_patch_size=4"]), 1)
    assert ve.opts.mask_ratio == 0.6 and ve.generator.opts.mask_ratio == 0.6
    assert build_method(load_config(None, VE_PICO), 1).generator.opts.mask_ratio == 0.75


def test_gan_weight_scales_the_adversarial_term(monkeypatch):
    ve, images, _, _ = ve_with_stubs(monkeypatch, ["method.gan_weight=1.0"])
    out = ve(images)
    p = out["parts"]
    assert torch.allclose(out["loss"], p["loss_img"] + p["loss_gan"] + p["loss_patch"] + p["loss_cls"], atol=1e-5)


def test_gradient_paths():
    torch.manual_seed(0)
    ve = build_method(load_config(None, VE_PICO), 1)
    out = ve(torch.randn(4, 1, 8, 8))
    g_params = [p for _, p in ve.optim_groups()["generator"]]
    d_params = [p for _, p in ve.optim_groups()["discriminator"]]

    def reaches(loss, params):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return any(g is not None and g.abs().sum() > 0 for g in grads)

    p = out["parts"]
    assert not reaches(p["loss_patch"], g_params) and reaches(p["loss_patch"], d_params)
    assert not reaches(p["loss_cls"], g_params) and reaches(p["loss_cls"], d_params)
    assert not reaches(p["loss_gan"], d_params) and reaches(p["loss_gan"], g_params)
    assert not reaches(p["loss_img"], d_params) and reaches(p["loss_img"], g_params)


def test_noise_in_the_latent_and_noise_off():
    torch.manual_seed(0)
    ve = build_method(load_config(None, VE_PICO + ["method.noise_std=0.5"]), 1).eval()
    x, mask = torch.randn(2, 1, 8, 8), torch.tensor([[True, True, True, False]] * 2)
    a, b = ve.generate(x, mask, 0.5), ve.generate(x, mask, 0.5)
    assert not torch.allclose(a, b)
    assert torch.equal(ve.generate(x, mask, 0.0), ve.generate(x, mask, 0.0))
    _, fake = ve.reconstruct(x, mask, 0.5)
    assert torch.equal(patchify(fake, 4)[:, 3], patchify(x, 4)[:, 3])     # visible patches are the originals


def test_discriminator_sees_every_patch_with_a_cls_token():
    ve = build_method(load_config(None, VE_PICO), 1)
    patch_logits, image_logits = ve.discriminator(torch.randn(5, 1, 8, 8))
    assert patch_logits.shape == (5, 4) and image_logits.shape == (5,)
    assert ve.encoder is ve.discriminator.backbone


@pytest.mark.parametrize("overrides", [["method.share_weights=true"],
                                       ["model.size=mini", "method.generator_size=pico"],
                                       ["method.generator=simmim", "method.mask_ratio=0.5", "method.mask_patch_size=4"]])
def test_model_options_build_and_step(overrides):
    base = VE_PICO_SIMMIM if "method.generator=simmim" in overrides else VE_PICO
    ve = build_method(load_config(None, base + overrides), 1)
    groups = ve.optim_groups()
    ids = [id(p) for params in groups.values() for _, p in params]
    assert len(ids) == len(set(ids))                                          # each parameter stepped once
    if "method.share_weights=true" in overrides:
        assert ve.generator.encoder is ve.discriminator.backbone
    if "method.generator_size=pico" in overrides:
        assert ve.generator.encoder.embed_dim == 64 and ve.encoder.embed_dim == 128
    ve(torch.randn(2, 1, 8, 8))["loss"].backward()


def test_tiny_ve_trains_resumes_and_discriminates(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", VE_TINY + ["train.steps=80", "train.log_every=10", "train.sample_every=40"])
    Trainer(cfg, tmp_path / "run").train(stop_after=40)
    Trainer(cfg, tmp_path / "run", resume=True).train()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 81, 10))
    assert rows[-1]["loss_img"] < 0.8 * rows[0]["loss_img"]
    balanced = (rows[-1]["acc_patch_original"] + rows[-1]["acc_patch_generated"]) / 2
    assert balanced > 0.6, rows[-1]
    for key in ("loss_gan", "loss_patch", "loss_cls", "acc_img_original", "acc_img_reconstructed",
                "acc_patch_visible_in_reconstruction",
                "grad_norm_generator", "grad_norm_discriminator"):
        assert key in rows[-1]
    assert (tmp_path / "run/samples/step-0000040.png").exists()
    # the result of pre-training is D's backbone: export and load_encoder return it
    assert_export_is_the_result(tmp_path / "run/last.pt", tmp_path / "enc", lambda method: method.discriminator.backbone)


def test_continual_pretraining_from_mae_and_simmim_checkpoints(fmnist_small, tmp_path):
    mae_cfg = tiny_config(fmnist_small, "mae", ["train.steps=2"])
    Trainer(mae_cfg, tmp_path / "mae").train()
    sim_cfg = tiny_config(fmnist_small, "simmim", ["train.steps=2", "method.layer_scale=null"])
    Trainer(sim_cfg, tmp_path / "simmim").train()
    mae_state = load_checkpoint(tmp_path / "mae/last.pt")["model"]
    sim_state = load_checkpoint(tmp_path / "simmim/last.pt")["model"]
    # the SimMIM run re-written in the official release's layout (encoder.*, q/v biases)
    official = {}
    for k, v in sim_state.items():
        if k.startswith("backbone.model."):
            name = "encoder." + k[len("backbone.model."):]
            if name.endswith("qkv.bias"):
                q, _, vb = v.chunk(3)
                official[name.replace("qkv.bias", "q_bias")], official[name.replace("qkv.bias", "v_bias")] = q, vb
            else:
                official[name] = v
    torch.save({"model": official}, tmp_path / "simmim_official.pth")
    cfg = tiny_config(fmnist_small, "mae", VE_TINY + [
        "train.steps=4", f"method.generator_init={tmp_path / 'mae/last.pt'}",
        f"method.discriminator_init={tmp_path / 'simmim_official.pth'}", "method.decoder_dim=32"])
    trainer = Trainer(cfg, tmp_path / "ve")
    ve = trainer.method
    assert torch.equal(ve.generator.decoder_pred.weight, mae_state["generator.decoder_pred.weight"])
    assert torch.equal(ve.encoder.model.blocks[2].mlp.fc1.weight, sim_state["backbone.model.blocks.2.mlp.fc1.weight"])
    q, _, v = sim_state["backbone.model.blocks.0.attn.qkv.bias"].chunk(3)   # the release format has no k bias
    assert torch.equal(ve.encoder.model.blocks[0].attn.qkv.bias, torch.cat([q, torch.zeros_like(q), v]))
    trainer.train(stop_after=2)
    Trainer(cfg, tmp_path / "ve", resume=True).train()
    assert load_checkpoint(tmp_path / "ve/last.pt")["step"] == 4


def test_swin_discriminator_with_simmim_generator():
    overrides = ["method.name=vision_electra", "method.generator=simmim", "method.mask_ratio=0.5",
                 "method.mask_patch_size=8", "model.arch=swin", "model.size=pico", "model.img_size=[32,32]",
                 "model.patch_size=2", "model.window_size=4"]
    ve = build_method(load_config(None, overrides), 1)
    patch_logits, image_logits = ve.discriminator(torch.randn(2, 1, 32, 32))
    assert patch_logits.shape == (2, 256) and image_logits.shape == (2,)
    cells = patch_logits.reshape(2, 16, 16)
    assert torch.equal(cells[:, 0::2, 0::2], cells[:, 1::2, 1::2])       # one verdict per last-stage cell (2x2 patches)
    out = ve(torch.randn(2, 1, 32, 32))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    mae_generator = [o for o in overrides if not o.startswith("method.mask_patch_size")] + ["method.generator=mae"]
    with pytest.raises(ValueError, match="generator=simmim"):
        build_method(load_config(None, mae_generator), 1)


def test_patch_accuracies_count_each_kind_of_patch():
    """Eq. 3 labels the original's patches and the reconstruction's visible ones real, its generated ones fake."""
    from mimkit.methods.vision_electra import patch_accuracy
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])        # 3 generated, 5 visible
    original = torch.tensor([[1.0, -1.0, 2.0, 3.0], [0.5, 0.5, -0.5, 1.0]])                # 6 of 8 > 0
    reconstruction = torch.tensor([[-2.0, 1.0, -1.0, 1.0], [-1.0, -3.0, 2.0, 2.0]])
    # visible in the reconstruction: (0,1) 1 ok, (0,2) -1 no, (1,0) -1 no, (1,2) 2 ok, (1,3) 2 ok -> 3 of 5
    # generated: (0,0) -2 ok, (0,3) 1 no, (1,1) -3 ok -> 2 of 3
    acc = patch_accuracy(torch.cat([original, reconstruction]), mask)
    assert acc["acc_patch_original"].item() == pytest.approx(6 / 8)
    assert acc["acc_patch_visible_in_reconstruction"].item() == pytest.approx(3 / 5)
    assert acc["acc_patch_generated"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("generator", ["mae", "simmim"])
def test_forward_hands_method_noise_std_to_the_generator(generator):
    """No stub of `generate`: the generator module itself is called with the configured latent noise."""
    extra = ["method.mask_patch_size=4"] if generator == "simmim" else []
    size = [int(v) for v in next(o for o in VE_PICO if o.startswith("model.img_size="))[16:-1].split(",")]
    base = VE_PICO_SIMMIM if generator == "simmim" else VE_PICO
    method = build_method(load_config(None, base + [f"method.generator={generator}", "method.noise_std=0.37"] + extra), 1)
    method.set_pixel_stats(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    seen = []
    target = method.generator if generator == "mae" else method.generator.backbone
    if generator == "mae":
        real = target.forward
        target.forward = lambda *a, **k: seen.append(k.get("latent_noise_std")) or real(*a, **k)
    else:
        real = method.generator.reconstruct
        method.generator.reconstruct = lambda *a, **k: seen.append(k.get("latent_noise_std")) or real(*a, **k)
    method(torch.randn(2, 1, *size))
    assert seen and all(s == 0.37 for s in seen), seen
