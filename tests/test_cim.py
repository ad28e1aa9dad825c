"""CIM (ViT enhancer): losses against hand values, gradient paths, sharing, the frozen tokenizer, pictures, resume."""
import pytest
import torch
import torch.nn.functional as F

from mimkit.config import ConfigError, load_config
from mimkit.methods import build_method
from mimkit.patches import unpatchify
from mimkit.targets import sliding_window_pixels
from tests.conftest import freeze_mask, train_cut_and_resume

CIM_PICO = ["method.name=cim", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
            "method.generator_depth=3"]


def cim(tokenizer, overrides=(), seed=0):
    torch.manual_seed(seed)
    method = build_method(load_config(None, CIM_PICO + [f"tokenizer.path={tokenizer}"] + list(overrides)), 1)
    method.set_pixel_stats(torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.35))
    return method


def test_respix_loss_against_hand_values(tiny_tokenizer):
    method = cim(tiny_tokenizer, ["method.sampling=argmax"])
    images = torch.randn(2, 1, 28, 28)
    mask = freeze_mask(method, images)
    out = method(images)
    logits = method.generator(images, mask)
    golden = method.tokenizer.encode(method.to_pixels(images)).flatten(1)
    loss_gen = -logits.log_softmax(-1).gather(-1, golden.unsqueeze(-1))[..., 0][mask].mean()
    corrupted_ids = torch.where(mask, logits.argmax(-1), golden)
    corrupted = method.from_pixels(method.tokenizer.decode(corrupted_ids.view(2, 7, 7)))
    pred = unpatchify(method.head(method.enhancer.model.forward_features(corrupted)[:, 1:]), (4, 4), (7, 7), 1)
    diff = pred - sliding_window_pixels(images, 8)
    loss_respix = diff.abs().mean() + diff.pow(2).mean()
    assert out["parts"]["loss_gen"].item() == pytest.approx(loss_gen.item(), abs=1e-5)
    assert out["parts"]["loss_respix"].item() == pytest.approx(loss_respix.item(), abs=1e-4)
    assert out["loss"].item() == pytest.approx((loss_gen + 10 * loss_respix).item(), abs=1e-3)


def test_revdet_loss_and_labels(tiny_tokenizer):
    method = cim(tiny_tokenizer, ["method.objective=revdet", "method.sampling=uniform"])
    images = torch.randn(2, 1, 28, 28)
    mask = freeze_mask(method, images)
    torch.manual_seed(1)
    c = method.corrupt(images, mask)
    labels = ((c["corrupted_ids"] != c["golden"]) & mask).float()
    assert labels[~mask].sum() == 0 and labels[mask].mean() > 0.8          # uniform over 64 codes: mostly replaced
    torch.manual_seed(1)
    out = method(images)
    logits = method.enhance(c["corrupted"])[..., 0]
    assert out["parts"]["loss_revdet"].item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, labels).item(), abs=1e-5)
    assert out["parts"]["revdet_all_original_accuracy"].item() == pytest.approx(1 - labels.mean().item())
    assert out["loss"].item() == pytest.approx((out["parts"]["loss_gen"] + out["parts"]["loss_revdet"]).item(), abs=1e-5)


def test_gradient_paths_sharing_and_the_frozen_tokenizer(tiny_tokenizer):
    method = cim(tiny_tokenizer)
    images = torch.randn(2, 1, 28, 28)
    freeze_mask(method, images)
    groups = method.optim_groups()
    gen_only = dict(groups["generator"])
    shared = {n: p for n, p in method.enhancer.named_parameters() if n.startswith(("model.patch_embed", "model.blocks.0.",
                                                                                     "model.blocks.1."))}
    assert method.generator.backbone.model.blocks[1] is method.enhancer.model.blocks[1]
    assert method.generator.backbone.model.blocks[2] is not method.enhancer.model.blocks[2]
    out = method(images)

    def grads(loss, params):
        got = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
        return {n: g for n, g in zip(params, got) if g is not None and g.abs().sum() > 0}

    assert not grads(out["parts"]["loss_respix"], gen_only)                # no enhancer gradient on the generator
    assert grads(out["parts"]["loss_gen"], gen_only)
    assert grads(out["parts"]["loss_respix"], shared) and grads(out["parts"]["loss_gen"], shared)   # both reach them
    before = {k: v.clone() for k, v in method.tokenizer.state_dict().items()}
    optimizer = torch.optim.AdamW([p for _, ps in groups.items() for _, p in ps], lr=1e-2)
    out["loss"].backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in method.tokenizer.state_dict().items())
    assert not method.tokenizer.training and not any(p.requires_grad for p in method.tokenizer.parameters())


def test_four_corrupted_images_from_one_masked_input_differ(tiny_tokenizer):
    method = cim(tiny_tokenizer)
    rows = dict(method.reconstruction_rows(torch.randn(3, 1, 28, 28)))
    draws = [rows[f"corrupted {i}"] for i in range(1, 5)]
    assert all(not torch.equal(draws[0], d) for d in draws[1:])
    assert set(rows) >= {"original", "masked", "output + original's stats (3a)", "output as predicted (3b)"}


def test_respix_rows_say_which_one_borrows_the_originals_statistics(tiny_tokenizer):
    """A.2 / Fig. 3: an all-zero prediction shown with the original's window mean and std *is* the original's local
    mean (the 3a row, titled so); the 3b row shows the prediction itself, which holds nothing of the original."""
    from mimkit.targets import sliding_window_stats
    method = cim(tiny_tokenizer)
    method.eval()
    images = torch.rand(2, 1, 28, 28)
    method.enhance = lambda corrupted: torch.zeros(2, 49, 16)                   # predicts 0 everywhere
    rows = dict(method.reconstruction_rows(images))
    mean, _ = sliding_window_stats(images, method.opts.window)
    assert torch.allclose(rows["output + original's stats (3a)"], mean, atol=1e-5)   # borrowed: the answer's mean
    assert torch.equal(rows["output as predicted (3b)"], torch.zeros(2, 3, 28, 28))  # nothing injected


@pytest.mark.parametrize("overrides, sentence", [(["method.objective=mim"], "method.objective must be one of"),
                                                 (["method.share_layers=5"], "share_layers=5 is out of range"),
                                                 (["method.sampling=topk"], "method.sampling must be one of")])
def test_option_errors_are_one_sentence(overrides, sentence):
    with pytest.raises((ConfigError, ValueError), match=sentence):
        load_config(None, CIM_PICO + overrides)


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_tiny_cim_resumes_exactly(fmnist_small, tmp_path, tiny_tokenizer, objective):
    cfg = load_config(None, CIM_PICO + [f"method.objective={objective}", f"tokenizer.path={tiny_tokenizer}",
                                        f"data.spec=idx:{fmnist_small}", "data.batch_size=16", "data.num_workers=0",
                                        "data.crop_scale=[0.5,1.0]", "optim.base_lr=2e-3", "optim.warmup_epochs=0",
                                        "train.log_every=1", "train.ckpt_every=1000", "train.sample_every=0",
                                        "train.steps=6"])
    full, cut = train_cut_and_resume(cfg, tmp_path)
    assert [r["step"] for r in cut] == list(range(1, 7))
    for a, b in zip(full, cut):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
