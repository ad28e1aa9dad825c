"""GAN-MAE: losses against hand-computed values, gradient paths per stage, adaptive gamma, schemes, training."""
import math
import re

import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.discriminators import forward_frozen
from mimkit.engine.trainer import Trainer
from mimkit.methods import build_method
from mimkit.patches import patchify, unpatchify
from tests.conftest import assert_export_is_the_result, metrics_rows, tiny_config, train_cut_and_resume

GM_PICO = ["method.name=gan_mae", "model.size=pico", "model.img_size=[8,8]", "model.patch_size=4",
           "method.decoder_dim=16", "method.decoder_depth=1", "method.decoder_heads=2"]
GM_TINY = ["method.name=gan_mae", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
MASK = torch.tensor([[True, False, True, True], [True, True, False, True], [False, True, True, True]])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def gan_mae(overrides=(), seed=0):
    torch.manual_seed(seed)
    method = build_method(load_config(None, GM_PICO + list(overrides)), 1)
    method.set_pixel_stats(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    return method


def fixed_mask(method, monkeypatch):
    monkeypatch.setattr(method.generator, "mask", lambda images: MASK)


def test_adversarial_loss_against_hand_values():
    method = gan_mae()
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    mask = torch.tensor([[True, False, True, False]])                  # tokens 0, 2 generated
    # the summary's L_adv = log D(X_v) + log(1 - D(X~_m)), averaged over the N = 4 tokens
    minimax = (math.log(1 - sigmoid(2.0)) + math.log(sigmoid(-1.0)) + math.log(1 - sigmoid(0.5))
               + math.log(sigmoid(0.0))) / 4
    assert method.adversarial_loss(logits, mask).item() == pytest.approx(minimax, abs=1e-6)
    # nonsaturating: -log D(X~_m) - log(1 - D(X_v)), averaged
    flipped = -(math.log(sigmoid(2.0)) + math.log(1 - sigmoid(-1.0)) + math.log(sigmoid(0.5))
                + math.log(1 - sigmoid(0.0))) / 4
    method.opts.adversarial_loss = "nonsaturating"
    assert method.adversarial_loss(logits, mask).item() == pytest.approx(flipped, abs=1e-6)
    # fooling D lowers L_adv: D calling the generated tokens original and the visible ones generated
    fooled = torch.tensor([[5.0, -5.0, 5.0, -5.0]])
    for kind in ("minimax", "nonsaturating"):
        method.opts.adversarial_loss = kind
        assert method.adversarial_loss(fooled, mask) < method.adversarial_loss(-fooled, mask)


def test_generator_and_discriminator_losses_against_hand_computation(monkeypatch):
    method = gan_mae(["method.gamma=0.5"])
    fixed_mask(method, monkeypatch)
    images = torch.randn(3, 1, 8, 8)
    carry = {"step": 0, "total_steps": 10}
    torch.manual_seed(1)
    out = method(images, "generator", carry)
    pred = method.generator(images, MASK)
    real = patchify(images, 4)
    m = MASK.float()
    loss_mae = (((pred - real) ** 2).mean(-1) * m).sum() / m.sum()
    corrupted = unpatchify(torch.where(MASK[..., None], pred, real), 4, (2, 2), 1)
    assert torch.allclose(carry["corrupted"], corrupted, atol=1e-6)
    logits = method.discriminator(corrupted)[0]
    sig = torch.sigmoid(logits)
    y = 1 - m                                                           # 1 = original (visible)
    loss_adv = (y * torch.log(sig) + (1 - y) * torch.log(1 - sig)).mean()
    parts = out["parts"]
    assert parts["loss_mae"].item() == pytest.approx(loss_mae.item(), abs=1e-6)
    assert parts["loss_adv"].item() == pytest.approx(loss_adv.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx((loss_mae + 0.5 * loss_adv).item(), abs=1e-5)
    d_out = method(images, "discriminator", carry)
    loss_disc = -(y * torch.log(sig) + (1 - y) * torch.log(1 - sig)).mean()
    assert d_out["loss"].item() == pytest.approx(loss_disc.item(), abs=1e-5)
    acc_fake = ((logits < 0).float() * m).sum() / m.sum()
    assert d_out["parts"]["acc_fake"].item() == pytest.approx(acc_fake.item())


def test_adaptive_gamma_is_the_gradient_norm_ratio_at_the_last_layer(monkeypatch):
    method = gan_mae(["method.gamma_base=0.8"])
    fixed_mask(method, monkeypatch)
    images = torch.randn(3, 1, 8, 8)
    torch.manual_seed(1)
    out = method(images, "generator", {"step": 0, "total_steps": 10})
    # by hand: two separate backward passes, reading the last layer's .grad
    last = method.generator.decoder_pred.weight
    _, pred, corrupted = method.corrupt(images)
    loss_mae = method.generator.target(images).sub(pred).pow(2).mean(-1)[MASK].mean()
    loss_mae.backward(retain_graph=True)
    g_mae = last.grad.norm().item()
    last.grad = None
    method.adversarial_loss(forward_frozen(method.discriminator, corrupted)[0], MASK).backward()
    g_adv = last.grad.norm().item()
    assert out["parts"]["gamma"].item() == pytest.approx(0.8 * g_mae / (g_adv + 1e-4), rel=1e-4)
    assert not out["parts"]["gamma"].requires_grad                      # a weight, not a path for gradients
    method.opts.gamma_max = 1e-3
    assert method(images, "generator", {"step": 0, "total_steps": 10})["parts"]["gamma"].item() == pytest.approx(0.8e-3)


def grads_of(loss, named):
    loss.backward(retain_graph=True)
    out = {n: (p.grad.clone() if p.grad is not None else None) for n, p in named}
    for _, p in named:
        p.grad = None
    return out


def nonzero(grads):
    return [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]


def test_gradient_paths_per_stage_with_sharing(monkeypatch):
    method = gan_mae(["method.gamma=1.0"])
    fixed_mask(method, monkeypatch)
    groups = method.optim_groups()
    assert groups["backbone"] and all(not n.startswith("encoder.") for n, _ in groups["generator"])
    everything = [(f"{g}.{n}", p) for g, named in groups.items() for n, p in named]
    images, carry = torch.randn(3, 1, 8, 8), {"step": 0, "total_steps": 10}
    gen = method(images, "generator", carry)
    # generator stage: L_mae and L_adv reach G and the shared backbone, never D's head
    for term in ("loss_mae", "loss_adv"):
        reached = nonzero(grads_of(gen["parts"][term], everything))
        assert not [n for n in reached if n.startswith("discriminator.")], term
        assert any(n.startswith("generator.decoder") for n in reached) and any(n.startswith("backbone.") for n in reached)
    # discriminator stage: L_disc reaches D's head and the shared backbone, never G's own parameters
    disc = method(images, "discriminator", carry)
    reached = nonzero(grads_of(disc["loss"], everything))
    assert not [n for n in reached if n.startswith("generator.")]
    assert "discriminator.patch_head.weight" in reached and any(n.startswith("backbone.") for n in reached)


def test_shared_backbone_gets_l_adv_through_the_generator_path_only(monkeypatch):
    """With sharing, L_adv's gradient on the backbone equals, in an unshared twin with equal weights, the
    gradient on the generator's encoder; the twin's D backbone gets none of it."""
    shared = gan_mae(["method.gamma=1.0"])
    twin = gan_mae(["method.gamma=1.0", "method.share_weights=false", "method.encoder=generator"])
    twin.load_state_dict(shared.state_dict(), strict=False)
    twin.discriminator.backbone.load_state_dict(shared.discriminator.backbone.state_dict())
    fixed_mask(shared, monkeypatch)
    fixed_mask(twin, monkeypatch)
    images = torch.randn(3, 1, 8, 8)
    outs = [m(images, "generator", {"step": 0, "total_steps": 10}) for m in (shared, twin)]
    g_shared = grads_of(outs[0]["parts"]["loss_adv"], list(shared.discriminator.backbone.named_parameters()))
    g_twin_encoder = grads_of(outs[1]["parts"]["loss_adv"], list(twin.generator.encoder.named_parameters()))
    g_twin_d = grads_of(outs[1]["parts"]["loss_adv"], list(twin.discriminator.backbone.named_parameters()))
    assert nonzero(g_shared)
    assert not nonzero(g_twin_d)
    for name, g in g_shared.items():
        if g is not None:
            assert torch.allclose(g, g_twin_encoder[name], atol=1e-6), name


def test_unshared_stages_touch_only_their_own_networks(monkeypatch):
    method = gan_mae(["method.gamma=1.0", "method.share_weights=false"])
    fixed_mask(method, monkeypatch)
    groups = method.optim_groups()
    assert groups["backbone"] == [] and method.encoder is method.discriminator.backbone   # default: D's backbone
    g_named, d_named = groups["generator"], groups["discriminator"]
    images, carry = torch.randn(3, 1, 8, 8), {"step": 0, "total_steps": 10}
    gen = method(images, "generator", carry)
    assert not nonzero(grads_of(gen["loss"], d_named)) and nonzero(grads_of(gen["loss"], g_named))
    disc = method(images, "discriminator", carry)
    assert not nonzero(grads_of(disc["loss"], g_named)) and nonzero(grads_of(disc["loss"], d_named))


def test_two_stage_scheme_is_plain_mae_before_the_switch(monkeypatch):
    method = gan_mae(["method.scheme=two-stage", "method.two_stage_switch=0.5"])
    assert [s.name for s in method.schedule(4, 0, 10)] == ["generator"]
    assert [s.name for s in method.schedule(5, 0, 10)] == ["generator", "discriminator"]
    images = torch.randn(3, 1, 8, 8)
    early = method(images, "generator", {"step": 4, "total_steps": 10})
    assert set(early["parts"]) == {"loss_mae"} and torch.equal(early["loss"], early["parts"]["loss_mae"])
    late = method(images, "generator", {"step": 5, "total_steps": 10})
    assert {"loss_adv", "gamma"} <= set(late["parts"])
    combined = gan_mae(["method.scheme=combined", "method.gamma=1.0"])
    fixed_mask(combined, monkeypatch)
    assert [s.name for s in combined.schedule(0, 0, 10)] == ["joint"]
    out = combined(images, "joint", {"step": 0, "total_steps": 10})
    p = out["parts"]
    assert out["loss"].item() == pytest.approx((p["loss_mae"] + p["loss_adv"] + p["loss_disc"]).item(), abs=1e-5)


@pytest.mark.parametrize("overrides, sentence", [
    (["method.encoder=generator"], "share_weights=false"),
    (["method.share_weights=false", "method.encoder=shared"], "needs method.share_weights=true"),
    (["method.scheme=alternating"], "method.scheme must be one of"),
    (["method.gamma=big"], "method.gamma must be adaptive or a number"),
    (["method.adversarial_loss=hinge"], "minimax or nonsaturating"),
])
def test_option_errors_are_one_sentence_at_config_time(overrides, sentence):
    with pytest.raises((ConfigError, ValueError), match=sentence):
        load_config(None, GM_PICO + overrides)


@pytest.mark.parametrize("overrides", [[], ["method.scheme=combined"],
                                       ["method.scheme=two-stage", "method.share_weights=false", "method.encoder=generator"],
                                       ["method.share_weights=false", "method.encoder=discriminator",
                                        "method.adversarial_loss=nonsaturating", "method.gamma=0.1"]])
def test_schemes_and_encoders_resume_exactly(fmnist_small, tmp_path, overrides):
    cfg = tiny_config(fmnist_small, "mae", GM_TINY + ["train.steps=6", "data.batch_size=16"] + overrides)
    full, cut = train_cut_and_resume(cfg, tmp_path)
    assert [r["step"] for r in cut] == list(range(1, 7))
    for a, b in zip(full, cut):
        for key in a:
            if "loss" in key or key.endswith(("gamma", "acc_fake")):
                assert abs(a[key] - b[key]) < 1e-5, (key, a["step"], a[key], b[key])
    assert "step_s" in full[-1] and "train_hours" in full[-1]


def test_tiny_gan_mae_learns_and_its_discriminator_beats_chance(fmnist_small, tmp_path):
    """At the shipped mask ratio (0.75), where D starts near the class prior ("generated" everywhere: balanced
    accuracy 0.5), it learns both classes within 60 steps; the generator's loss falls."""
    cfg = tiny_config(fmnist_small, "mae", GM_TINY + ["train.steps=60", "train.log_every=10", "train.sample_every=60",
                                                      "optim.base_lr=1e-3", "method.mask_ratio=0.75"])
    Trainer(cfg, tmp_path / "run").train()
    log = metrics_rows(tmp_path / "run")
    assert log[-1]["generator/loss_mae"] < 0.8 * log[0]["generator/loss_mae"]
    first, last = log[0]["discriminator/acc_balanced"], log[-1]["discriminator/acc_balanced"]
    assert last > 0.75 and last > first + 0.15 and log[-1]["discriminator/acc_real"] > 0.5, (first, log[-1])
    grid = Image.open(tmp_path / "run/samples/final.png")
    assert grid.mode == "RGB" and grid.size[1] == 20 + 4 * 84 + 5 * 2    # title band + four rows, the last an RGB heat map
    # the result is the shared backbone: `eval report` and export take the run like any other
    assert main(["eval", "report", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--data", f"idx:{fmnist_small}",
                 "--train-limit", "300", "--test-limit", "100", "--severities", "5"]) == 0
    assert "gan_mae" in (tmp_path / "rep/report.md").read_text()
    assert (tmp_path / "rep/reconstruction-0.png").exists()
    assert_export_is_the_result(tmp_path / "run/last.pt", tmp_path / "enc", lambda method: method.discriminator.backbone)


def backbone_gradients_at_update(cfg, tmp_path):
    """The shared backbone's gradient each time its optimiser steps during one training step, and its step count."""
    trainer = Trainer(cfg, tmp_path)
    seen, optimizer = [], trainer.optimizers["backbone"]
    step = optimizer.step

    def recorded(*args, **kwargs):
        seen.append([p.grad.clone() for p in trainer.params["backbone"]])
        return step(*args, **kwargs)
    optimizer.step = recorded
    trainer.train()
    return seen, int(next(iter(optimizer.state.values()))["step"])


def test_backbone_update_once_takes_both_stages_gradients_in_one_update(fmnist_small, tmp_path):
    """Adversarial scheme, shared backbone: per_stage steps it twice a step (twice the weight decay), once sums the
    generator stage's and D's stage's gradients into one AdamW update. At a negligible lr the weights do not move
    between the two stages, so the once-update's gradient is the sum of the two per-stage ones."""
    base = GM_TINY + ["train.steps=1", "data.batch_size=8", "optim.base_lr=1e-30", "optim.weight_decay=0"]
    twice, per_stage_steps = backbone_gradients_at_update(tiny_config(fmnist_small, "mae", base), tmp_path / "a")
    once, once_steps = backbone_gradients_at_update(
        tiny_config(fmnist_small, "mae", base + ["method.backbone_update=once"]), tmp_path / "b")
    assert (per_stage_steps, len(twice), once_steps, len(once)) == (2, 2, 1, 1)
    for g_once, g_gen, g_disc in zip(once[0], *twice):
        assert torch.allclose(g_once, g_gen + g_disc, atol=1e-6, rtol=1e-5)


def test_a_short_shipped_run_shows_reconstruction_and_balanced_accuracy(fmnist_small, tmp_path, capsys):
    """`loss` and the progress line: the generator's reconstruction loss and D's balanced accuracy, not the sum
    L_mae + gamma L_adv + L_disc (kept as loss_sum_of_stages)."""
    run = tmp_path / "r"
    assert main(["pretrain", "--config", "configs/gan-mae_vit-mini_fmnist-tiny.yaml", "--out", str(run), "--data",
                 f"idx:{fmnist_small}", "--steps", "2", "data.batch_size=16", "data.num_workers=0",
                 "train.log_every=1", "train.sample_every=0"]) == 0
    row = metrics_rows(run)[-1]
    assert row["loss"] == row["loss_mae"] == row["generator/loss_mae"]
    assert row["acc_balanced"] == pytest.approx((row["discriminator/acc_real"] + row["discriminator/acc_fake"]) / 2)
    total = row["generator/loss"] + row["discriminator/loss"]
    assert row["loss_sum_of_stages"] == pytest.approx(total, rel=1e-5)
    printed = capsys.readouterr().out
    assert re.search(r"step 2/2 loss_mae [\d.]+ acc_balanced [\d.]+ lr ", printed), printed


@pytest.mark.parametrize("overrides, sentence", [
    (GM_PICO + ["method.two_stage_switch=0.3"], "method.two_stage_switch has no effect outside method.scheme=two-stage"),
    (GM_PICO + ["method.gamma=0.1", "method.gamma_base=1.0"], "method.gamma_base has no effect with a fixed method.gamma"),
    (GM_PICO + ["method.gamma=0.1", "method.gamma_max=10"], "method.gamma_max has no effect with a fixed method.gamma"),
    (GM_PICO + ["method.scheme=combined", "method.backbone_update=once"],
     "backbone_update has no effect with method.scheme=combined"),
    (["method.name=vision_electra", "method.generator=mae", "method.mask_patch_size=8"],
     "mask_patch_size has no effect with the MAE"),
    (["method.name=vision_electra", "method.gan_loss=false", "method.gan_weight=0.5"], "gan_weight has no effect"),
    (["method.name=cae", "method.target=tokens", "method.norm_pix_loss=false"],
     "norm_pix_loss has no effect with method.target=tokens"),
    (["method.name=cae", "method.decoder=false", "method.decoder_depth=2"], "decoder_depth has no effect"),
    (["method.name=cim", "method.rgb_bins=16"], "rgb_bins has no effect with the BEiT generator"),
    (["method.name=cim", "method.objective=revdet", "method.window=4"], "method.window has no effect"),
    (["method.name=perceptual_mae", "method.loss=mse", "method.critic_width=8"],
     "critic_width has no effect with method.loss=mse"),
    (["method.name=perceptual_mae", "method.loss=lsgan-p", "method.ssim_alpha=0.5"], "ssim_alpha has no effect"),
    (["method.name=perceptual_mae", "method.loss=lsgan-p", "method.r1_interval=8"],
     "r1_interval has no effect with method.r1_gamma=0"),
])
def test_options_without_effect_are_refused_in_one_sentence(overrides, sentence):
    with pytest.raises(ConfigError, match=sentence):
        load_config(None, overrides)
