"""Perceptual MAE part 1: Eq. 2-5 against hand values, gradient paths, the even-epoch schedule across a resume,
dVAE-P's frozen tokenizer and the official-code switches."""
import pytest
import torch
import torch.nn.functional as F

from mimkit.config import ConfigError, load_config
from mimkit.discriminators import ConvCritic
from mimkit.losses.perceptual import (feature_matching_terms, gram_matrix, lsgan_discriminator_loss,
                                      lsgan_generator_loss, ms_ssim_l1_loss, ssim_map)
from mimkit.methods import build_method
from tests.conftest import metrics_rows, train_cut_and_resume

PMAE_PICO = ["method.name=perceptual_mae", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
             "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2", "method.critic_depth=3",
             "method.critic_width=8"]


def pmae(overrides=(), seed=0):
    torch.manual_seed(seed)
    critic = not any(o in overrides for o in ("method.loss=mse", "method.loss=msssim", "method.loss=dvae-p"))
    base = PMAE_PICO if critic else [o for o in PMAE_PICO if not o.startswith("method.critic_")]
    method = build_method(load_config(None, base + list(overrides)), 1)
    method.set_pixel_stats(torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.35))
    return method


def grads(loss, module):
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    got = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: g for n, g in zip(params, got) if g is not None and g.abs().sum() > 0}


def direct_ssim(x, y):
    """SSIM at every pixel from its reflected 3x3 neighbourhood, one pixel at a time."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    xp, yp = F.pad(x, (1, 1, 1, 1), mode="reflect"), F.pad(y, (1, 1, 1, 1), mode="reflect")
    out = torch.empty_like(x)
    for i in range(x.shape[-2]):
        for j in range(x.shape[-1]):
            a, b = xp[..., i:i + 3, j:j + 3].flatten(-2), yp[..., i:i + 3, j:j + 3].flatten(-2)
            ma, mb = a.mean(-1), b.mean(-1)
            va, vb = (a * a).mean(-1) - ma ** 2, (b * b).mean(-1) - mb ** 2
            cov = (a * b).mean(-1) - ma * mb
            out[..., i, j] = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return out


def test_ms_ssim_term_equals_a_direct_computation_and_vanishes_on_identical_images():
    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert torch.allclose(ssim_map(x, y), direct_ssim(x, y), atol=1e-5)
    expected = 0.0
    for scale in range(4):
        xs, ys = (F.avg_pool2d(t, 2 ** scale) if scale else t for t in (x, y))
        expected += ((1 - direct_ssim(xs, ys)) / 2).mean() / 4
    ssim_term, l1_term = ms_ssim_l1_loss(x, y, alpha=0.85)
    assert ssim_term.item() == pytest.approx(0.85 * expected.item(), abs=1e-6)
    assert l1_term.item() == pytest.approx(0.15 * (x - y).abs().mean().item(), abs=1e-7)
    same = ms_ssim_l1_loss(x, x.clone())
    assert same[0].item() == pytest.approx(0.0, abs=1e-6) and same[1].item() == 0.0


def test_gram_matrix_and_feature_style_terms_equal_hand_values():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])            # [1, 2, 2, 2]
    g = gram_matrix(f)[0]
    # rows: <f0, f0> = 30, <f0, f1> = 5, <f1, f1> = 2; divided by C*H*W = 8
    assert torch.allclose(g, torch.tensor([[30.0, 5.0], [5.0, 2.0]]) / 8)
    r = torch.zeros_like(f)
    feature, style = feature_matching_terms([f, f[:, :1]], [r, r[:, :1]])
    assert feature[0].item() == pytest.approx((1 + 2 + 3 + 4 + 0 + 1 + 1 + 0) / 8)
    assert feature[1].item() == pytest.approx(10 / 4)
    assert style[0].item() == pytest.approx((30 + 5 + 5 + 2) / 8 / 4)
    assert style[1].item() == pytest.approx(30 / 4)                                     # 1x1 Gram: 30 / (1*2*2)


def test_lsgan_losses_equal_eq_4_and_5():
    real, fake = torch.tensor([0.5, 1.5]), torch.tensor([0.2, -0.4])
    assert lsgan_discriminator_loss(real, fake).item() == pytest.approx(0.5 * 0.25 + (0.04 + 0.16) / 2)
    assert lsgan_discriminator_loss(real, fake, half_on_fake=True).item() == pytest.approx(0.125 + 0.05)
    assert lsgan_discriminator_loss(real, fake, square_batch_mean=True).item() == pytest.approx(0.0 + 0.01)
    assert lsgan_generator_loss(fake).item() == pytest.approx(0.5 * (0.64 + 1.96) / 2)
    assert lsgan_generator_loss(fake, square_batch_mean=True).item() == pytest.approx(0.5 * 1.1 ** 2)


def test_critics_expose_their_layers():
    x = torch.randn(2, 3, 32, 48)
    logits, feats = ConvCritic(3, (32, 48), "dcgan", 8, 3)(x)
    assert logits.shape == (2,) and [f.shape[1:] for f in feats] == [(8, 16, 24), (16, 8, 12), (32, 4, 6)]
    logits, feats = ConvCritic(3, (32, 48), "patchgan", 8, 3)(x)
    assert logits.dim() == 3 and logits.shape[0] == 2 and len(feats) == 4


def test_lsgan_p_losses_and_gradient_paths():
    method = pmae()
    images = torch.randn(4, 1, 28, 28)
    torch.manual_seed(1)
    out = method(images, "generator", {"epoch": 1})                    # epoch 2 counted from 1: perceptual on
    torch.manual_seed(1)
    mask, _, fake = method.reconstruct(images)[:3]
    fake_logits, fake_feats = method.critic(fake)
    with torch.no_grad():
        _, real_feats = method.critic(images)
    l1 = (fake - images).abs().mean() * 0.35                             # [0, 1] pixels: std 0.35
    feature, style = feature_matching_terms(fake_feats, real_feats)
    adv = 0.5 * ((fake_logits - 1) ** 2).mean()
    p = out["parts"]
    assert p["loss_l1"].item() == pytest.approx(l1.item(), rel=1e-5)
    assert p["loss_adv"].item() == pytest.approx(adv.item(), rel=1e-4)
    assert p["loss_feature"].item() == pytest.approx(0.05 * sum(feature).item(), rel=1e-4)
    assert p["loss_style"].item() == pytest.approx(40 * sum(style).item(), rel=1e-4)
    assert out["loss"].item() == pytest.approx((l1 + adv + 0.05 * sum(feature) + 40 * sum(style)).item(), rel=1e-4)
    for term in ("loss_adv", "loss_feature", "loss_style"):
        assert grads(p[term], method.generator) and not grads(p[term], method.critic), term
    critic_out = method(images, "critic", {"fake": fake.detach()})
    assert grads(critic_out["loss"], method.critic) and not grads(critic_out["loss"], method.generator)


def test_official_code_switches():
    images = torch.randn(4, 1, 28, 28)
    base = pmae()
    torch.manual_seed(1)
    ref = base(images, "generator", {"epoch": 1})["parts"]
    twice = pmae(["method.l1_counted_twice=true", "method.adversarial_weight=0.7"])
    torch.manual_seed(1)
    out = twice(images, "generator", {"epoch": 1})
    p = out["parts"]
    assert p["loss_adv"].item() == pytest.approx(0.7 * ref["loss_adv"].item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((2 * p["loss_l1"] + p["loss_adv"] + p["loss_feature"] +
                                                p["loss_style"]).item(), rel=1e-5)
    normalized = pmae(["method.losses_on_normalized_images=true"])
    torch.manual_seed(1)
    assert normalized(images, "generator", {"epoch": 1})["parts"]["loss_l1"].item() == \
        pytest.approx(ref["loss_l1"].item() / 0.35, rel=1e-5)                  # the same error, 1 / std larger
    frozen = pmae(["method.perceptual_without_gradient=true"])
    out = frozen(images, "generator", {"epoch": 1})["parts"]
    assert not out["loss_feature"].requires_grad and not out["loss_style"].requires_grad    # no gradient to G
    assert grads(out["loss_adv"], frozen.generator)


@pytest.mark.parametrize("rule, on_epochs", [(None, [1, 3]), ("odd", [0, 2]), ("every", [0, 1, 2, 3])])
def test_perceptual_epochs(rule, on_epochs):
    method = pmae([f"method.perceptual_epochs={rule}"] if rule else [])
    images = torch.randn(2, 1, 28, 28)
    seen = [e for e in range(4) if "loss_adv" in method(images, "generator", {"epoch": e})["parts"]]
    assert seen == on_epochs


def test_perceptual_term_follows_epoch_parity_across_a_resume(fmnist_small, tmp_path):
    cfg = load_config(None, PMAE_PICO + [f"data.spec=idx:{fmnist_small}", "data.batch_size=512", "data.num_workers=0",
                                         "optim.warmup_epochs=0", "train.log_every=1", "train.ckpt_every=1000",
                                         "train.sample_every=0", "train.steps=6", "train.epochs=1.5", "optim.base_lr=1e-3"])
    full, cut = train_cut_and_resume(cfg, tmp_path, cut_at=3)       # 2,048 images / 512 = 4 steps an epoch
    for rows in (full, cut):
        assert ["generator/loss_adv" in r for r in rows] == [False] * 4 + [True] * 2
        assert all("critic/loss_critic" in r for r in rows)
    for a, b in zip(full, cut):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    assert metrics_rows(tmp_path / "full")[-1]["generator/gram_diff_layer0"] >= 0


def test_dvae_p_uses_the_frozen_tokenizer_and_never_changes_it(tiny_tokenizer):
    method = pmae(["method.loss=dvae-p", f"tokenizer.path={tiny_tokenizer}"])
    assert not hasattr(method, "critic") and [s.name for s in method.stages] == ["generator"]
    images = torch.randn(2, 1, 28, 28)
    torch.manual_seed(1)
    out = method(images, "generator", {"epoch": 0})
    torch.manual_seed(1)
    fake = method.reconstruct(images).image
    feats = method.tokenizer.features(fake * 0.35 + 0.3)
    with torch.no_grad():
        real = method.tokenizer.features(images * 0.35 + 0.3)
    feature, style = feature_matching_terms(feats, real)
    assert out["parts"]["loss_feature"].item() == pytest.approx(0.05 * sum(feature).item(), rel=1e-4)
    assert out["parts"]["loss_style"].item() == pytest.approx(40 * sum(style).item(), rel=1e-4)
    assert "loss_adv" not in out["parts"] and grads(out["parts"]["loss_feature"], method.generator)
    before = {k: v.clone() for k, v in method.tokenizer.state_dict().items()}
    opt = torch.optim.AdamW([p for _, ps in method.optim_groups().items() for _, p in ps], lr=1e-2)
    out["loss"].backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in method.tokenizer.state_dict().items())


@pytest.mark.parametrize("overrides, sentence", [
    (["method.loss=vgg"], "method.loss must be one of"),
    (["method.critic=stylegan"], "method.critic must be one of"),
    (["method.norm_pix_loss=true"], "needs method.loss=mse"),
    (["method.perceptual_epochs=third"], "perceptual_epochs must be one of even, odd, every"),
    (["model.arch=swin"], "method perceptual_mae pre-trains model.arch=vit"),
])
def test_option_errors_are_one_sentence(overrides, sentence):
    with pytest.raises((ConfigError, ValueError), match=sentence):
        load_config(None, PMAE_PICO + overrides)


def frozen_mask_pmae(overrides, images):
    from tests.conftest import freeze_mask
    method = pmae(overrides)
    mask = freeze_mask(method.generator, images)
    return method, mask


def test_mse_total_is_maes_masked_mse_by_hand():
    images = torch.randn(2, 1, 28, 28)
    method, mask = frozen_mask_pmae(["method.loss=mse"], images)
    out = method(images, "generator", {"epoch": 1})
    pred = method.generator(images, mask)                                       # [B, L, 16]: patches of 4x4
    target = F.unfold(images, 4, stride=4).transpose(1, 2)                     # raw pixels, per patch
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5) and set(out["parts"]) == {"loss_mse"}


def test_msssim_total_by_hand_on_and_off_its_epochs():
    """Eq. 2 on its epochs: alpha (1 - MS-SSIM) / 2 + (1 - alpha) L1 over [0, 1] pixels (the method's own pieces
    checked against a direct SSIM elsewhere); off them L1 alone."""
    images = torch.rand(2, 1, 28, 28) * 0.8
    method, mask = frozen_mask_pmae(["method.loss=msssim", "method.perceptual_epochs=even"], images)
    std, mean = 0.35, 0.3
    normalised = (images - mean) / std
    fake = F.fold(method.generator(normalised, mask).transpose(1, 2), (28, 28), 4, stride=4) * std + mean
    l1 = (fake - images).abs().mean()
    ssim_term, l1_term = ms_ssim_l1_loss(fake, images, 0.85, method.opts.ssim_scales, method.opts.ssim_window)
    on = method(normalised, "generator", {"epoch": 1})
    off = method(normalised, "generator", {"epoch": 0})
    assert off["loss"].item() == pytest.approx(l1.item(), rel=1e-5) and set(off["parts"]) == {"loss_l1"}
    assert on["loss"].item() == pytest.approx((ssim_term + l1_term).item(), rel=1e-5)
    assert l1_term.item() == pytest.approx(0.15 * l1.item(), rel=1e-5)           # (1 - alpha) L1, alpha 0.85


def test_paste_visible_ignores_the_decoders_visible_pixels():
    images = torch.randn(2, 1, 28, 28)
    method, mask = frozen_mask_pmae(["method.loss=msssim", "method.paste_visible=true"], images)
    pred = method.generator(images, mask).detach().requires_grad_(True)
    method.generator.forward = lambda x, m, **k: pred
    loss = method(images, "generator", {"epoch": 1})["loss"]
    (grad,) = torch.autograd.grad(loss, pred)
    assert grad[~mask].abs().sum() == 0 and grad[mask].abs().sum() > 0          # visible outputs do not count
    rec = method.reconstruct(images)
    visible = ~F.interpolate(mask.view(2, 1, 7, 7).float(), scale_factor=4).bool()
    assert torch.equal(rec.image[visible], images[visible])


def test_a_generator_stage_leaves_the_critic_unchanged(fmnist_small, tmp_path):
    """Trainer level: across each generator update (its backward and optimiser step) the critic's weights stay as they
    were; they move in the critic stage only."""
    from mimkit.engine.trainer import Trainer
    cfg = load_config(None, PMAE_PICO + [f"data.spec=idx:{fmnist_small}", "data.batch_size=16", "data.num_workers=0",
                                         "train.steps=3", "train.log_every=1", "train.sample_every=0",
                                         "method.perceptual_epochs=every", "optim.warmup_epochs=0"])
    trainer = Trainer(cfg, tmp_path / "run")
    critic = trainer.method.critic
    checks = []
    for group, optimizer in trainer.optimizers.items():
        step = optimizer.step

        def watched(*args, group=group, step=step, **kwargs):
            before = [p.detach().clone() for p in critic.parameters()]
            result = step(*args, **kwargs)
            checks.append((group, all(torch.equal(a, p) for a, p in zip(before, critic.parameters()))))
            return result
        optimizer.step = watched
    trainer.train()
    assert [g for g, _ in checks] == ["generator", "critic"] * 3
    assert all(same for g, same in checks if g == "generator") and not any(same for g, same in checks if g == "critic")


def test_lsgan_p_generator_terms_equal_the_official_formula_with_its_switches():
    """tractableai/perceptual-mae (src/losses/image_reconstruction.py), LS-GAN-P's generator loss written out:
    L1 + w_gan * 0.5 (mean D(fake) - 1)^2 + w_l1 L1 + w_perc sum_i L1(phi_i) + w_style sum_i L1(Gram(phi_i)), Gram over
    C*H*W, L1 on the normalised images, phi_i = the critic's 4 block outputs with the gradient kept. With mimkit's
    switches for each of these (and the same critic: its sigmoid output layer is the one difference left) the totals
    are equal."""
    images = torch.randn(3, 1, 28, 28)
    switches = ["method.critic_depth=4", "method.l1_counted_twice=true", "method.lsgan_square_batch_mean=true",
                "method.adversarial_weight=0.7", "method.losses_on_normalized_images=true",
                "method.perceptual_epochs=every", "method.feature_weight=0.05", "method.style_weight=40.0"]
    method, mask = frozen_mask_pmae(switches, images)
    out = method(images, "generator", {"epoch": 0})
    pred = method.generator(images, mask)
    fake = F.fold(pred.transpose(1, 2), (28, 28), 4, stride=4)
    logits, fake_maps = method.critic(fake)
    _, real_maps = method.critic(images)
    l1 = (fake - images).abs().mean()
    gram = lambda f: (f.flatten(2) @ f.flatten(2).transpose(1, 2)) / f[0].numel()    # noqa: E731
    perc = sum((f - r).abs().mean() for f, r in zip(fake_maps, real_maps))
    style = sum((gram(f) - gram(r)).abs().mean() for f, r in zip(fake_maps, real_maps))
    official = l1 + 0.7 * 0.5 * (logits.mean() - 1) ** 2 + 1.0 * l1 + 0.05 * perc + 40.0 * style
    assert len(fake_maps) == 4 and out["loss"].item() == pytest.approx(official.item(), rel=1e-5)
    assert grads(out["parts"]["loss_feature"], method.generator)                 # the gradient is kept, as there
