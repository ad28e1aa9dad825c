"""Perceptual MAE part 2: multi-scale decoder outputs, the MSG-GAN critic, MSG-MAE skips, StyleGANv2-ADA's R1,
path-length regularisation and adaptive augmentation."""
import pytest
import torch
import torch.nn.functional as F

from mimkit.config import ConfigError, load_config
from mimkit.discriminators.ada import OPS, AdaptiveAugment
from mimkit.discriminators.multiscale import MultiScaleCritic, minibatch_stddev
from mimkit.losses.gan import path_length_penalty, r1_penalty
from mimkit.losses.perceptual import image_pyramid
from mimkit.methods.mae import MAEGenerator
from mimkit.methods.perceptual_mae import MultiScaleMAEGenerator, default_skip_pairs
from tests.conftest import assert_export_is_the_result, freeze_mask, metrics_rows, train_cut_and_resume
from tests.test_perceptual_mae import PMAE_PICO, grads, pmae

MSG = ["method.loss=msg-gan-p", "method.scales=3", "method.decoder_depth=3", "method.perceptual_epochs=every"]
STYLE = ["method.loss=stylegan2-ada-p", "method.scales=3", "method.decoder_depth=3", "method.perceptual_epochs=every"]


def record_critic_inputs(method):
    seen = []
    method.critic.register_forward_pre_hook(lambda module, args: seen.append([t.shape for t in args[0]]))
    return seen


def test_the_msg_critic_receives_every_scale_and_reals_are_pooled():
    method = pmae(MSG)
    images = torch.randn(4, 1, 28, 28)
    seen = record_critic_inputs(method)
    carry = {"step": 0, "epoch": 0}
    method(images, "generator", carry)
    method(images, "critic", carry)
    shapes = [torch.Size([4, 1, 28, 28]), torch.Size([4, 1, 14, 14]), torch.Size([4, 1, 7, 7])]
    assert seen == [shapes] * 4                  # G: fake + real (features); D: real + fake
    real = method.real_view(images)
    assert torch.allclose(real[2], images.reshape(4, 1, 7, 4, 7, 4).mean(dim=(3, 5)), atol=1e-6)
    assert [f.shape for f in carry["fake"]] == shapes and not any(f.requires_grad for f in carry["fake"])
    with pytest.raises(ValueError, match="takes 3 scales"):
        method.critic(real[:2])


def test_rgb_heads_make_each_scale_from_their_block_and_the_official_order_is_an_option():
    def gen(order, scales=6, depth=8):
        return pmae(["method.loss=msg-gan-p", f"method.scales={scales}", f"method.decoder_depth={depth}",
                     "model.img_size=[64,64]", f"method.rgb_order={order}"]).generator
    assert gen("coarse_to_fine", 3, 8).rgb_scale == {5: 2, 6: 1}
    assert gen("coarse_to_fine", 5, 8).rgb_scale == {3: 4, 4: 3, 5: 2, 6: 1}
    assert gen("fine_to_coarse", 5, 8).rgb_scale == {3: 1, 4: 2, 5: 3, 6: 4}
    g = gen("coarse_to_fine", 5, 5)                # 64 px, patch 4: 1/2, 1/4 from pixels per token; 1/8, 1/16 pooled
    tokens = torch.randn(2, 1 + 256, 32)
    for k, size in ((1, 32), (2, 16), (3, 8), (4, 4)):
        assert g.rgb_image(tokens, k).shape == (2, 1, size, size)
    per_token = g.to_rgb[str(g.block_of_scale[4])](tokens[:, 1:]).reshape(2, 16, 16)   # one value per token
    assert torch.allclose(g.rgb_image(tokens, 4)[:, 0], per_token.reshape(2, 4, 4, 4, 4).mean(dim=(2, 4)), atol=1e-6)


def test_critic_gradients_reach_every_rgb_head_and_never_the_critic():
    method = pmae(MSG + ["method.msg_mae=false"])
    out = method(torch.randn(4, 1, 28, 28), "generator", {"epoch": 0})
    adv = grads(out["parts"]["loss_adv"], method.generator)
    assert {f"to_rgb.{i}.weight" for i in method.generator.rgb_scale} <= set(adv)
    assert not grads(out["loss"], method.critic)


def test_msg_mae_skips_carry_the_critic_gradient_into_the_encoder_blocks():
    """The encoder's own output is cut from the graph: what reaches the encoder blocks comes through the skips."""
    def encoder_grads(msg_mae):
        method = pmae(MSG + [f"method.msg_mae={msg_mae}"])
        encoder = method.generator.encoder
        forward_visible = encoder.forward_visible

        def cut_output(images, ids, return_layers=None):
            out = forward_visible(images, ids, return_layers)
            return (out[0].detach(), out[1]) if return_layers else out.detach()
        encoder.forward_visible = cut_output
        out = method(torch.randn(4, 1, 28, 28), "generator", {"epoch": 0})
        return method, grads(out["parts"]["loss_adv"], encoder)
    method, got = encoder_grads("true")
    assert method.generator.skip_from == {1: 2, 2: 1}          # pico: 4 encoder blocks, 3 decoder blocks
    assert any(n.startswith("model.blocks.1.") for n in got) and any(n.startswith("model.blocks.2.") for n in got)
    assert not any(n.startswith("model.blocks.3.") for n in got)   # after the deepest tap: only the cut path
    assert encoder_grads("false")[1] == {}


def test_without_msg_mae_the_generator_is_part_1s_plus_rgb_heads():
    part1 = pmae(["method.loss=lsgan-p", "method.decoder_depth=3"], seed=0)
    assert type(part1.generator) is MAEGenerator
    msg = pmae(MSG + ["method.msg_mae=false"], seed=1)
    assert isinstance(msg.generator, MultiScaleMAEGenerator) and not msg.generator.skip_from
    missing, unexpected = msg.generator.load_state_dict(part1.generator.state_dict(), strict=False)
    assert not unexpected and {k.split(".")[0] for k in missing} == {"to_rgb"}
    images = torch.randn(2, 1, 28, 28)
    mask = freeze_mask(part1.generator, images)
    with torch.no_grad():
        assert torch.equal(part1.generator(images, mask), msg.generator(images, mask))
    skips = pmae(MSG).generator.state_dict()
    assert {k for k in skips if k.startswith("skip_proj")} == {f"skip_proj.{i}.{p}" for i in (1, 2)
                                                              for p in ("weight", "bias")}
    assert skips["skip_proj.1.weight"].shape == (32, 64)       # [d, 2d]


def test_default_skip_pairs_are_the_official_ones():
    assert default_skip_pairs(12, 8) == [(10, 1), (9, 2), (8, 3), (7, 4), (6, 5), (5, 6), (4, 7)]
    assert default_skip_pairs(4, 8) == [(2, 1), (1, 2), (0, 3)]
    g = pmae(MSG + ["method.skip_pairs=[[0,2]]"]).generator
    assert g.skip_from == {2: 0} and list(g.skip_proj) == ["2"]


def test_minibatch_stddev_appends_the_group_std():
    x = torch.randn(8, 3, 2, 2)
    y = minibatch_stddev(x, group=4)
    groups = x.reshape(4, 2, 3, 2, 2)                          # image b is in group member b // 2, column b % 2
    expected = groups.std(dim=0, unbiased=False).mean(dim=(1, 2, 3))
    assert torch.equal(y[:, :3], x)
    assert torch.allclose(y[:, 3, 0, 0], expected.repeat(4), atol=1e-6)
    assert minibatch_stddev(torch.randn(6, 1, 2, 2), group=4).shape == (6, 2, 2, 2)   # group falls to 2


def test_r1_equals_hand_computed_gradient_penalties():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    w = torch.randn(2, 4, 4)
    linear = (x * w).sum(dim=(1, 2, 3)) + 0.5                    # grad = w for every image
    assert r1_penalty(linear, x, gamma=10).item() == pytest.approx(5 * w.square().sum().item(), rel=1e-6)
    quadratic = x.square().sum(dim=(1, 2, 3))                    # grad = 2 x
    expected = 2 * (2 * x.detach()).square().sum(dim=(1, 2, 3)).mean()
    assert r1_penalty(quadratic, x, gamma=4).item() == pytest.approx(expected.item(), rel=1e-6)
    critic = torch.nn.Linear(32, 1)                              # the penalty trains the critic
    penalty = r1_penalty(critic(x.flatten(1)).squeeze(1), x, gamma=2)
    penalty.backward()
    assert torch.allclose(critic.weight.grad, 2 * critic.weight.detach(), atol=1e-6)   # d(||w||^2)/dw


def test_r1_is_lazy_and_weighted_by_its_interval():
    method = pmae(STYLE + ["method.ada=false"])
    images = torch.randn(4, 1, 28, 28)
    carry = {"step": 0, "epoch": 0}
    method(images, "generator", carry)
    on = method(images, "critic", dict(carry, step=16))
    off = method(images, "critic", dict(carry, step=17))
    assert "loss_r1" in on["parts"] and "loss_r1" not in off["parts"]
    assert on["loss"].item() == pytest.approx(on["parts"]["loss_critic"].item() + 16 * on["parts"]["loss_r1"].item(),
                                              rel=1e-5)
    assert on["parts"]["loss_critic"].item() == pytest.approx(off["parts"]["loss_critic"].item(), rel=1e-5)


def test_path_length_penalty_against_a_direct_computation():
    torch.manual_seed(0)
    latent = torch.randn(3, 5, 4, requires_grad=True)
    w = torch.randn(4, 6)
    feats = [(latent @ w).permute(0, 2, 1).contiguous().reshape(3, 6, 5, 1), latent.sum(1).reshape(3, 1, 2, 2)]
    running = torch.tensor(0.5)
    torch.manual_seed(1)
    got = path_length_penalty(feats, latent, running, decay=0.1)
    torch.manual_seed(1)
    n0, n1 = torch.randn(3, 6, 5, 1), torch.randn(3, 1, 2, 2)
    # d/d latent of <A latent w, n0> / sqrt(5) + <sum_t latent, n1> / 2
    g = torch.einsum("bct,dc->btd", n0.reshape(3, 6, 5), w) / 5 ** 0.5 + n1.reshape(3, 1, 4) / 2
    lengths = g.square().sum(-1).mean(-1).sqrt()
    mean = 0.5 + 0.1 * (lengths.mean() - 0.5)
    assert running.item() == pytest.approx(mean.item(), rel=1e-5)
    assert got.item() == pytest.approx((lengths - mean).square().mean().item(), rel=1e-4)


def test_path_length_trains_the_generator_only_and_is_lazy():
    method = pmae(STYLE + ["method.ada=false", "method.feature_weight=0", "method.style_weight=0"])
    images = torch.randn(4, 1, 28, 28)
    on = method(images, "generator", {"step": 4, "epoch": 0})
    assert "loss_path_length" not in method(images, "generator", {"step": 5, "epoch": 0})["parts"]
    pl = on["parts"]["loss_path_length"]
    assert on["loss"].item() == pytest.approx((on["parts"]["loss_l1"] + on["parts"]["loss_adv"] + 2 * 4 * pl).item(),
                                              rel=1e-5)
    got = grads(pl, method.generator)
    assert any(n.startswith("encoder.") for n in got) and any(n.startswith("decoder_blocks.") for n in got)
    assert not grads(pl, method.critic)
    assert method.pl_mean.item() > 0


def test_ada_p_rises_when_the_critic_over_fits_reals_and_falls_otherwise():
    ada = AdaptiveAugment(target=0.6, interval=4, kimg=1.0)
    for _ in range(4):
        ada.observe(torch.full((8,), 0.9))                       # every real above the LS-GAN midpoint: r_t = 1
    ada.adjust()
    assert ada.p.item() == pytest.approx(32 / 1000)
    for _ in range(4):
        ada.observe(torch.tensor([0.9] * 4 + [0.1] * 4))         # r_t = 0 < 0.6
    ada.adjust()
    assert ada.p.item() == pytest.approx(0.0, abs=1e-7)
    ada.adjust()                                                 # no observations: no change
    ada.observe(torch.full((8,), 0.1))
    ada.adjust()
    assert ada.p.item() == 0.0                                   # clipped at 0


def test_ada_through_the_method_updates_every_interval_and_is_logged():
    method = pmae(STYLE + ["method.r1_gamma=0", "method.ada_kimg=0.001"])    # one image moves p by 1: saturates
    images = torch.randn(4, 1, 28, 28)
    carry = {"step": 0, "epoch": 0}
    method(images, "generator", carry)
    method.critic.to_logit.bias.data.fill_(5.0)                  # D says "real" to everything: over-fitting
    ps = [method(images, "critic", dict(carry, step=s))["parts"]["ada_p"].item() for s in range(8)]
    assert ps == [0, 0, 0, 1, 1, 1, 1, 1]
    method.critic.to_logit.bias.data.fill_(-5.0)
    assert method(images, "critic", dict(carry, step=11))["parts"]["ada_p"].item() == 0


def test_augmentations_are_shared_by_real_and_fake_and_by_every_scale_and_are_differentiable():
    torch.manual_seed(0)
    ada = AdaptiveAugment(p=1.0)
    full = torch.randn(4, 3, 32, 32)
    draw = ada.sample(4, (8, 8), full.device)
    out = ada.pyramid(image_pyramid(full, 3), draw)
    augmented = ada(full, draw)
    assert not torch.allclose(augmented, full)
    for k in (1, 2):                                             # each scale = the pooled augmented full image
        assert torch.allclose(out[k], F.avg_pool2d(augmented, 2 ** k), atol=1e-5)
    assert torch.equal(ada(full.clone(), draw), augmented)       # same draw, same transform
    none = AdaptiveAugment(p=0.0)
    assert torch.allclose(none(full, none.sample(4, (8, 8), full.device)), full, atol=1e-6)
    one = {op: AdaptiveAugment(p=1.0, ops=(op,)) for op in OPS}  # each operation changes the image
    for op, aug in one.items():
        torch.manual_seed(3)
        assert not torch.allclose(aug(full, aug.sample(4, (8, 8), full.device)), full), op
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    small = ada.sample(2, (4, 4), x.device)
    assert torch.autograd.gradcheck(lambda t: ada(t, small), (x,))


def test_method_augments_real_and_fake_alike():
    method = pmae(STYLE + ["method.ada_p=1.0"])
    images = torch.randn(4, 1, 28, 28)
    pyramid = method.real_view(images)
    torch.manual_seed(0)
    real, fake = method.critic_views(pyramid, [t.clone() for t in pyramid])
    assert all(torch.equal(r, f) for r, f in zip(real, fake)) and not torch.allclose(real[0], images)


def test_stylegan2_ada_p_trains_resumes_exactly_and_exports_a_plain_vit(fmnist_small, tmp_path):
    cfg = load_config(None, PMAE_PICO + STYLE + [
        f"data.spec=idx:{fmnist_small}", "data.batch_size=128", "data.num_workers=0", "optim.warmup_epochs=0",
        "train.log_every=1", "train.ckpt_every=1000", "train.sample_every=0", "train.steps=6", "optim.base_lr=1e-3",
        "method.r1_interval=2", "method.pl_interval=2", "method.ada_interval=2", "method.ada_kimg=5", "method.ada_p=0.3",
        "method.critic_width=8"])
    full, cut = train_cut_and_resume(cfg, tmp_path, cut_at=3)
    for a, b in zip(full, cut):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert a.get("critic/ada_p") == pytest.approx(b.get("critic/ada_p"), abs=1e-7)
    rows = metrics_rows(tmp_path / "full")
    assert ["critic/loss_r1" in r for r in rows] == [True, False] * 3
    assert ["generator/loss_path_length" in r for r in rows] == [True, False] * 3
    assert rows[-1]["critic/ada_p"] != pytest.approx(0.3)             # p moved, by 0.05 an update
    assert_export_is_the_result(tmp_path / "full" / "last.pt", tmp_path / "vit.safetensors")


@pytest.mark.parametrize("overrides, sentence", [
    (MSG + ["method.scales=4", "method.decoder_depth=4"], "must be divisible by 2\\^\\(method.scales-1\\) = 8"),
    (MSG + ["method.scales=5", "model.img_size=[32,32]"], "raise method.decoder_depth"),
    (MSG + ["method.skip_pairs=[1,2]"], "list of \\[encoder block, decoder block\\] pairs"),
    (MSG + ["method.msg_mae=false", "method.skip_pairs=[[1,2]]"], "needs method.msg_mae=true"),
    (["method.loss=mse", "method.ada=true"], "need a critic"),
    (STYLE + ["method.ada_ops=[xflip,hue]"], "unknown entries"),
    (STYLE + ["method.ada_target=1.5"], "must be in \\[0, 1\\]"),
    (MSG + ["method.critic_block=vgg"], "method.critic_block must be one of msg, residual"),
    (MSG + ["model.patch_size=7", "model.img_size=[28,28]"], "must be a power of 2"),
    (STYLE + ["train.compile=true"], "torch.compile has no double backward"),
])
def test_part_2_option_errors_are_one_sentence(overrides, sentence):
    with pytest.raises((ConfigError, ValueError), match=sentence):
        load_config(None, PMAE_PICO + overrides)


def test_skip_pairs_naming_missing_blocks_are_refused():
    with pytest.raises(ValueError, match="name blocks that do not exist"):
        pmae(MSG + ["method.skip_pairs=[[9,1]]"])


def test_multi_scale_critic_block_kinds_and_combines():
    pyramid = image_pyramid(torch.randn(4, 3, 16, 16), 3)
    for block in ("msg", "residual"):
        for combine in ("lin_cat", "simple"):
            critic = MultiScaleCritic(3, (16, 16), 3, width=4, block=block, combine=combine)
            logits, feats = critic(pyramid)
            assert logits.shape == (4,) and [f.shape[-1] for f in feats] == [8, 4, 4]
            assert (critic.blocks[0].skip is not None) == (block == "residual")
    with pytest.raises(ValueError, match="cannot make 4 scales"):
        MultiScaleCritic(3, (20, 20), 4)


def test_the_official_critic_map_set_drops_the_final_conv():
    """critic_feature_maps=blocks: the perceptual terms read the S-1 block outputs only (the official MSG-GAN-P set);
    the default reads them and the final conv's map. The terms differ by exactly that last layer's share."""
    images = torch.randn(2, 1, 28, 28)
    full = pmae(MSG)
    torch.manual_seed(1)
    every = full(images, "generator", {"epoch": 1})["parts"]
    blocks = pmae(MSG + ["method.critic_feature_maps=blocks"])
    torch.manual_seed(1)
    official = blocks(images, "generator", {"epoch": 1})["parts"]
    assert sorted(k for k in every if k.startswith("gram_diff_layer")) == [f"gram_diff_layer{j}" for j in range(3)]
    assert sorted(k for k in official if k.startswith("gram_diff_layer")) == [f"gram_diff_layer{j}" for j in range(2)]
    for j in range(2):
        assert every[f"gram_diff_layer{j}"].item() == pytest.approx(official[f"gram_diff_layer{j}"].item(), rel=1e-6)
    assert official["loss_style"].item() == pytest.approx(
        40 * sum(every[f"gram_diff_layer{j}"] for j in range(2)).item(), rel=1e-4)
