"""CAE: the regressor never updates Z_v, the alignment target carries no gradient, the decoder sees only the
masked positions, block masking counts, losses against hand values, Table 2 switches, official weights, resume."""

import pytest
import torch
import torch.nn.functional as F

from mimkit.backbones import sincos_pos_embed_2d
from mimkit.config import ConfigError, load_config
from mimkit.methods import build_method
from mimkit.patches import patchify
from tests.conftest import assert_export_is_the_result, tiny_config, train_cut_and_resume

CAE_PICO = ["method.name=cae", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
            "method.regressor_depth=2", "method.decoder_depth=2"]


def cae(overrides=(), tokenizer=None, seed=0):
    torch.manual_seed(seed)
    extra = [f"tokenizer.path={tokenizer}"] if tokenizer else ["method.target=pixels"]
    base = [o for o in CAE_PICO if "method.decoder=false" not in overrides or not o.startswith("method.decoder_depth")]
    method = build_method(load_config(None, base + extra + list(overrides)), 1)
    method.set_pixel_stats(torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.35))
    return method


def test_regressor_keys_and_values_hold_z_visible_unchanged():
    method = cae()
    seen = []
    for block in method.regressor.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), args[1].detach(), out.detach())))
    images = torch.randn(3, 1, 28, 28)
    out = method.predict(images, method.mask(images))
    k = out["z_visible"].shape[1]
    assert len(seen) == 2
    previous = method.mask_token.expand(3, method.num_masked, -1)
    for queries, keys_values, updated in seen:
        assert torch.equal(keys_values[:, :k], out["z_visible"])              # Z_v, never updated
        assert torch.equal(keys_values[:, k:], queries)                         # then the previous layer's output
        assert torch.equal(queries, previous)
        previous = updated
    assert torch.allclose(out["z_masked"], method.regressor.norm(previous))


def test_decoder_sees_z_masked_and_masked_positions_only():
    method = cae()
    captured = {}
    method.decoder.register_forward_hook(lambda mod, args, out: captured.update(z=args[0], pos=args[1]))
    images = torch.randn(3, 1, 28, 28)
    mask = method.mask(images)
    out = method.predict(images, mask)
    assert captured["z"].shape == (3, method.num_masked, method.encoder.embed_dim) and torch.equal(captured["z"], out["z_masked"])
    expected_pos = method.rd_pos_embed[0, 1:][out["ids_masked"]]
    assert torch.equal(captured["pos"], expected_pos)
    assert mask.gather(1, out["ids_masked"]).all() and not mask.gather(1, out["ids_visible"]).any()


def test_alignment_target_carries_no_gradient():
    method = cae()
    images = torch.randn(2, 1, 28, 28)
    mask = method.mask(images)
    method.mask = lambda x: mask
    loss_align = method(images)["parts"]["loss_align"]
    grads = torch.autograd.grad(loss_align, [p for p in method.encoder.parameters() if p.requires_grad], allow_unused=True)
    # by hand: the same MSE against a constant target; only the Z_m path may carry gradient
    out = method.predict(images, mask)
    target = method.encode(images, out["ids_masked"]).detach()
    manual = torch.autograd.grad(F.mse_loss(out["z_masked"], target), [p for p in method.encoder.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for ours, theirs in zip(grads, manual):
        assert (ours is None and theirs is None) or torch.allclose(ours, theirs, atol=1e-6)


def test_block_masking_takes_exactly_98_of_196():
    method = build_method(load_config(None, ["method.name=cae", "method.target=pixels", "model.size=pico",
                                             "model.img_size=[224,224]", "model.patch_size=16"]), 3)
    mask = method.mask(torch.zeros(64, 3, 224, 224))
    assert method.min_block == 16 and mask.sum(1).eq(98).all()
    assert cae().min_block == 4 and cae().mask(torch.zeros(8, 1, 28, 28)).sum(1).eq(24).all()


def test_losses_equal_hand_values_with_tokens(tiny_tokenizer):
    method = cae(tokenizer=tiny_tokenizer)
    images = torch.randn(3, 1, 28, 28)
    mask = method.mask(images)
    method.mask = lambda x: mask
    parts = method(images)["parts"]
    out = method.predict(images, mask)
    ids = method.tokenizer.encode(method.to_pixels(images)).flatten(1)
    labels = ids.gather(1, out["ids_masked"])
    log_p = out["prediction"].log_softmax(-1)
    loss_tokens = -log_p.gather(-1, labels.unsqueeze(-1)).mean()
    target = method.encoder.forward_visible(images, out["ids_masked"])[:, 1:]
    loss_align = (out["z_masked"] - target).pow(2).mean()
    assert parts["loss_tokens"].item() == pytest.approx(loss_tokens.item(), abs=1e-5)
    assert parts["loss_align"].item() == pytest.approx(loss_align.item(), abs=1e-5)
    total = method(images)["loss"]
    assert total.item() == pytest.approx((loss_tokens + 2 * loss_align).item(), abs=1e-4)


def test_pixel_target_is_mse_on_normalised_masked_patches():
    method = cae(["method.alignment=false"])
    images = torch.randn(2, 1, 28, 28)
    mask = method.mask(images)
    method.mask = lambda x: mask
    out = method.predict(images, mask)
    real = patchify(images, 4)
    norm = (real - real.mean(-1, keepdim=True)) / (real.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (out["prediction"] - norm[mask].view(2, -1, 16)).pow(2).mean()
    result = method(images)
    assert set(result["parts"]) == {"loss_pixels"}                              # alignment=false: no l_z
    assert result["loss"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_switches_remove_exactly_their_part():
    no_decoder = cae(["method.decoder=false"])
    assert len(no_decoder.decoder.blocks) == 0
    images = torch.randn(2, 1, 28, 28)
    out = no_decoder.predict(images, no_decoder.mask(images))
    assert torch.equal(out["prediction"], no_decoder.decoder.head(out["z_masked"]))   # a linear layer on Z_m
    calls = []
    no_align = cae(["method.alignment=false"])
    no_align.encoder.forward_visible = lambda *a, _f=no_align.encoder.forward_visible: calls.append(1) or _f(*a)
    no_align(images)
    assert len(calls) == 1                                                       # the target pass is gone too
    full = cae()
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in no_decoder.parameters()) == \
        sum(p.numel() for p in full.decoder.blocks.parameters()) + sum(p.numel() for p in full.decoder.norm.parameters())


def test_position_table_is_the_official_layout():
    """CAE's code: meshgrid(w, h) in 'ij' order, [sin(w), cos(w), sin(h), cos(h)] with a zero CLS row."""
    dim, side = 32, 5
    gw, gh = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ow, oh = torch.outer(gw.flatten(), omega), torch.outer(gh.flatten(), omega)
    official = torch.cat([torch.zeros(1, dim), torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], 1)])
    assert torch.allclose(sincos_pos_embed_2d(dim, (side, side), True, rows_first=True)[0], official, atol=1e-6)
    method = cae()
    assert not method.encoder.model.pos_embed.requires_grad and not method.rd_pos_embed.requires_grad


@pytest.mark.parametrize("overrides, sentence", [(["method.target=logits"], "tokens or pixels"),
                                                 (["method.regressor_depth=0"], "regressor_depth=0 is out of range")])
def test_option_errors_are_one_sentence(overrides, sentence):
    with pytest.raises((ConfigError, ValueError), match=sentence):
        load_config(None, CAE_PICO + overrides)


def test_tokens_target_without_a_tokenizer_is_one_sentence():
    with pytest.raises(ValueError, match="needs a tokenizer: set tokenizer.path"):
        build_method(load_config(None, CAE_PICO), 1)


@pytest.mark.parametrize("target", ["pixels", "tokens"])
def test_tiny_cae_resumes_exactly_and_learns(fmnist_small, tmp_path, tiny_tokenizer, target):
    extra = ["method.target=pixels"] if target == "pixels" else [f"tokenizer.path={tiny_tokenizer}"]
    cfg = tiny_config(fmnist_small, "mae", ["method.name=cae", "method.regressor_depth=1", "method.decoder_depth=1",
                                            "train.steps=6", "data.batch_size=16", "model.drop_path=0.1"] + extra)
    full, cut = train_cut_and_resume(cfg, tmp_path)
    assert [r["step"] for r in cut] == list(range(1, 7))
    for a, b in zip(full, cut):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    key = "loss_pixels" if target == "pixels" else "loss_tokens"
    assert full[-1][key] < full[0][key]
    assert_export_is_the_result(tmp_path / "full/last.pt", tmp_path / "enc")   # a plain timm ViT, the run's encoder



def test_init_and_weight_decay_follow_the_official_code():
    """Atten4Vis/CAE: xavier-uniform on every Linear, the encoder's too (qkv std sqrt(1 / (2 D)): 0.026 at ViT-B,
    where timm's init gives 0.020); patch embedding, CLS token and mask query trunc-normal 0.02 within one std; the
    optimizer exempts biases and 1-D parameters only, so the CLS token and mask query decay."""
    from mimkit.config import GroupOptimConfig
    from mimkit.engine.trainer import make_optimizer
    method = build_method(load_config(None, CAE_PICO + ["method.target=pixels", "model.embed_dim=256",
                                                        "model.num_heads=4"]), 1)
    vit = method.encoder.model
    qkv = vit.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx((1 / (2 * 256)) ** 0.5, rel=0.05)                 # 0.0442 at D=256
    assert method.decoder.head.weight.std().item() == pytest.approx((2 / (256 + 16)) ** 0.5, rel=0.1)
    for tensor in (vit.patch_embed.proj.weight, vit.cls_token, method.mask_token):
        assert tensor.abs().max() <= 0.02 and tensor.std() > 0.005
    cfg = load_config(None, CAE_PICO + ["method.target=pixels"])
    named = list(method.named_parameters())
    optimizer = make_optimizer([(n, p) for n, p in named if p.requires_grad], cfg, 1e-3, GroupOptimConfig(),
                               method.no_weight_decay_keys)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(vit.cls_token) in decayed and id(method.mask_token) in decayed
    assert not any(id(p) in decayed for n, p in named if p.ndim == 1)
