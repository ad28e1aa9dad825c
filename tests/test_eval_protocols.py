"""Evaluation protocols (issue 4): each one must be able to fail, i.e. it measures something."""
import json

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

from mimkit.cli import main
from mimkit.data import build_dataset
from mimkit.engine.trainer import Trainer
from mimkit.eval import extract_features
from mimkit.eval.attentive import AttentiveClassifier, attentive_probe_top1
from mimkit.eval.finetune import (FinetuneConfig, FinetuneTransform, classifier_from_encoder, finetune,
                                  finetune_param_groups)
from mimkit.eval.linear import ProbedClassifier, linear_probe, linear_probe_top1
from mimkit.eval.recon import ms_ssim_settings, reconstruction_metrics
from mimkit.eval.robustness import CORRUPTIONS, corrupt, corruption_accuracy, corruption_errors
from tests.conftest import tiny_config

VIT = dict(img_size=[28, 28], patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4, num_classes=0)


@pytest.fixture(scope="module")
def mae_run(fmnist_small, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "mae"
    cfg = tiny_config(fmnist_small, "mae", ["train.steps=200", "train.log_every=50", "data.batch_size=64",
                                            "model.pool=mean", "optim.warmup_epochs=1"])
    Trainer(cfg, run).train()
    return run


def test_layer_decay_groups_are_timms(tmp_path):
    cfg = FinetuneConfig(layer_decay=0.5, weight_decay=0.05)
    model = timm.create_model("vit_tiny_patch16_224", **dict(VIT, num_classes=10, global_pool="avg"))
    ours = finetune_param_groups(model, cfg)
    theirs = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                      no_weight_decay_list=list(model.no_weight_decay()))
    assert [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in ours] == \
        [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in theirs]
    scale = {id(p): g["lr_scale"] for g in ours for p in g["params"]}
    assert scale[id(model.patch_embed.proj.weight)] == pytest.approx(0.5 ** 5)   # embedding: depth + 1 below the head
    assert scale[id(model.blocks[3].mlp.fc1.weight)] == pytest.approx(0.5)
    assert scale[id(model.head.weight)] == 1.0


def test_attentive_probe_attends_over_patches_and_trains_only_itself():
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", **VIT)
    clf = AttentiveClassifier(encoder, num_classes=10)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    assert "head.0.query" in trainable
    logits = clf(torch.randn(3, 1, 28, 28))
    attn = clf.head[0].last_attention
    assert logits.shape == (3, 10) and attn.shape == (3, 4, 49)                  # 49 patches, the CLS excluded
    assert torch.allclose(attn.sum(-1), torch.ones(3, 4), atol=1e-5)
    logits.sum().backward()
    assert all(p.grad is None for p in clf.encoder.parameters())


def test_attentive_probe_finds_the_informative_patch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(1200, 16, 32, generator=gen)
    labels = torch.randint(0, 3, (1200,), generator=gen)
    centers = torch.randn(3, 32, generator=gen) * 4
    tokens[torch.arange(1200), 5] += centers[labels]                              # only patch 5 carries the class
    acc = attentive_probe_top1(tokens[:1000], labels[:1000], tokens[1000:], labels[1000:], num_heads=4,
                               epochs=30, batch_size=100, lr=0.05)
    shuffled = attentive_probe_top1(tokens[:1000], labels[torch.randperm(1000, generator=gen)], tokens[1000:],
                                    labels[1000:], num_heads=4, epochs=30, batch_size=100, lr=0.05)
    assert acc > 90 and shuffled < 60


def test_lars_linear_probe_learns_separable_classes():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 3
    y = torch.randint(0, 4, (2000,), generator=gen)
    x = centers[y] + torch.randn(2000, 16, generator=gen)
    assert linear_probe_top1(x[:1600], y[:1600], x[1600:], y[1600:], optimizer="lars", batch_size=64, epochs=30) > 90
    noise = torch.randn(2000, 16, generator=gen)
    assert linear_probe_top1(noise[:1600], y[:1600], noise[1600:], y[1600:], optimizer="lars", batch_size=64, epochs=30) < 40


def test_reconstruction_metrics_of_an_identity_reconstruction_are_perfect(fmnist_small):
    class Identity(torch.nn.Module):
        def reconstruction_rows(self, images):
            return [("original", images), ("reconstruction", images.clone())]

    test = build_dataset(f"idx:{fmnist_small}", "test")
    feature_net = timm.create_model("vit_tiny_patch16_224", **VIT)
    from mimkit.eval.recon import EncoderFeatures
    m = reconstruction_metrics(Identity(), test, [28, 28], [0.286], [0.353], num_images=64,
                               fid_encoder=EncoderFeatures(feature_net, [0.286], [0.353]), fid_encoder_name="tiny")
    # exact up to the float round trip through the normalisation: PSNR at its maximum (> 100 dB, inf if exact)
    assert m["l1"] < 1e-6 and m["psnr"] > 100 and m["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert m["ms_ssim"] == pytest.approx(1.0, abs=1e-4) and abs(m["fid"]) < 1e-2
    kernel, betas = ms_ssim_settings(224, 224)
    assert kernel == 11 and betas == pytest.approx((0.0448, 0.2856, 0.3001, 0.2363, 0.1333), abs=1e-4)
    assert ms_ssim_settings(28, 28)[0] == 11 and len(ms_ssim_settings(28, 28)[1]) == 2


def test_fid_encoder_measures_images_of_another_size_resized_to_its_own():
    """A 28 px FID encoder on a 32 px run (SimMIM's tiny recipe) used to stop with timm's size assertion."""
    from mimkit.eval.features import embed
    from mimkit.eval.recon import EncoderFeatures
    torch.manual_seed(0)
    net = EncoderFeatures(timm.create_model("vit_tiny_patch16_224", **VIT).eval(), [0.3], [0.35])
    big = torch.rand(3, 1, 32, 32)
    small = torch.nn.functional.interpolate(big, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    expected = embed(net.encoder, (small - 0.3) / 0.35, "mean")
    assert torch.allclose(net(big), expected, atol=1e-5) and torch.allclose(net(small), expected, atol=1e-5)


def test_reconstruction_metrics_say_why_a_method_without_a_reconstruction_is_not_measured(fmnist_small):
    """CIM's rows are corrupted samples and an enhancer output; `eval recon` / the report used to stop with KeyError."""
    class Corrupter(torch.nn.Module):
        def reconstruction_rows(self, images):
            return [("original", images), ("corrupted 1", images.flip(-1)), ("enhancer output", images)]

    test = build_dataset(f"idx:{fmnist_small}", "test")
    m = reconstruction_metrics(Corrupter(), test, [28, 28], [0.286], [0.353], num_images=16)
    assert m["l1"] is None and m["psnr"] is None and m["fid"] is None
    assert "no reconstruction" in m["not_measured"] and "enhancer output" in m["not_measured"]


def test_reconstruction_metrics_of_a_run_are_seeded_and_imperfect(mae_run, fmnist_small):
    from mimkit.engine.checkpoint import load_checkpoint
    from mimkit.export import method_from_checkpoint
    method, cfg = method_from_checkpoint(load_checkpoint(mae_run / "last.pt"))
    test = build_dataset(f"idx:{fmnist_small}", "test")
    a = reconstruction_metrics(method, test, [28, 28], [0.286], [0.353], num_images=64)
    b = reconstruction_metrics(method, test, [28, 28], [0.286], [0.353], num_images=64)
    assert a["psnr"] == b["psnr"] and 5 < a["psnr"] < 40 and a["l1"] > 0     # same masks, real errors


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_changes_images_more_with_severity(name):
    images = (torch.rand(4, 1, 28, 28) * 255).to(torch.uint8)
    clean = images.float() / 255
    d1 = (corrupt(images, name, 1) - clean).abs().mean()
    d5 = (corrupt(images, name, 5) - clean).abs().mean()
    assert 0 < d1 < d5
    assert torch.equal(corrupt(images, name, 3, seed=1), corrupt(images, name, 3, seed=1))


def test_corruptions_lower_a_probed_models_accuracy(mae_run, fmnist_small):
    from mimkit import load_encoder
    encoder = load_encoder(mae_run / "last.pt")
    train = build_dataset(f"idx:{fmnist_small}", "train")
    test = build_dataset(f"idx:{fmnist_small}", "test")
    stats = ([0.286], [0.353])
    feats, labels = extract_features(encoder, train, [28, 28], *stats, pool="mean")
    clf = ProbedClassifier(encoder, linear_probe(feats, labels, 10), "mean")
    table = corruption_accuracy(clf, test, [28, 28], *stats, corruptions=["gaussian_noise", "contrast"], severities=(1, 5))
    assert table["gaussian_noise"][1] < table["clean"] - 10 and table["contrast"][1] < table["clean"] - 10
    ce = corruption_errors(table, table)
    assert ce["mCE"] == pytest.approx(1.0)
    worse = {k: ([a - 5 for a in v] if k != "clean" else v) for k, v in table.items()}
    assert corruption_errors(worse, table)["mCE"] > 1.0


def test_finetuning_learns(fmnist_small):
    cfg = FinetuneConfig(epochs=3, batch_size=64, base_lr=1e-2, warmup_epochs=0.5, mixup=0.0, cutmix=0.0,
                         randaug=None, drop_path=0.0, layer_decay=1.0, crop_scale=[0.5, 1.0], num_workers=0)
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", **VIT)
    model = classifier_from_encoder("vit_tiny_patch16_224", VIT, encoder.state_dict(), 10, cfg)
    train = build_dataset(f"idx:{fmnist_small}", "train")
    test = build_dataset(f"idx:{fmnist_small}", "test")
    result = finetune(model, train, test, [28, 28], [0.286], [0.353], cfg, log=lambda m: None)
    # from random init, 96 steps on 2,048 images (seen: 20.9 -> 36.7 -> 44.4); chance is 10
    assert result["best_top1"] > 30 and result["best_top1"] >= result["final_top1"]
    assert result["history"][-1]["top1"] > result["history"][0]["top1"]


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_at_full_magnitude_posterizes_to_black_on_any_pillow(channels):
    """rand-m9-mstd0.5 draws magnitude 10 a few times in a hundred; PosterizeIncreasing then keeps 0 bits, which
    recent Pillow refuses with a ValueError that stopped fine-tuning runs."""
    transform = FinetuneTransform((28, 28), FinetuneConfig(), [0.5] * channels)
    op = next(op for op in transform.randaug.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    transform.randaug.ops, transform.randaug.num_layers = [op], 1
    image = torch.full((channels, 28, 28), 200, dtype=torch.uint8)
    assert transform(image, seed=0).max() == 0
    op.magnitude = 5                                     # 2 bits kept: 200 -> 192
    assert transform(image, seed=0).max() == 192


def test_eval_commands_and_report(mae_run, fmnist_small, tmp_path, capsys):
    data = ["--data", f"idx:{fmnist_small}"]
    for argv in (["eval", "attentive", "--ckpt", str(mae_run / "last.pt"), "--epochs", "5"],
                 ["eval", "linear", "--ckpt", str(mae_run / "last.pt"), "--optimizer", "lars", "--epochs", "5"],
                 ["eval", "finetune", "--ckpt", str(mae_run / "last.pt"), "--recipe", "configs/finetune/fmnist-tiny.yaml",
                  "--set", "epochs=1", "--set", "num_workers=0"],
                 ["eval", "recon", "--ckpt", str(mae_run / "last.pt"), "--num-images", "32"],
                 ["visualize", "attention", "--ckpt", str(mae_run / "last.pt"), "--out", str(tmp_path / "a.png")],
                 ["visualize", "reconstruction", "--ckpt", str(mae_run), "--out", str(tmp_path / "r.png"),
                  "--num-images", "5"]):
        assert main(argv + data) == 0, argv
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert "top1" in out or "psnr" in out or "attention_png" in out or "reconstruction_png" in out
    assert (tmp_path / "a.png").stat().st_size > 0
    from PIL import Image
    assert Image.open(tmp_path / "r.png").size[0] > 5 * 84                 # 5 columns of 84 px tiles + row titles
    assert main(["eval", "report", str(mae_run), f"random:{mae_run}", "--out", str(tmp_path / "rep"), *data,
                 "--train-limit", "500", "--test-limit", "200", "--severities", "5"]) == 0
    report = (tmp_path / "rep/report.md").read_text()
    assert "| run | k-NN | linear | attentive | L1 | PSNR" in report and "random init" in report
    for name in ("attention-0.png", "attention-1.png", "reconstruction-0.png", "reconstruction-1.png",
                 "loss-curves-0.png"):
        assert (tmp_path / "rep" / name).exists() and f"]({name})" in report
    assert not (tmp_path / "rep" / "loss-curves-1.png").exists()        # random init was not trained
    rows = json.loads((tmp_path / "rep/report.json").read_text())
    assert rows[1]["robustness"]["ce"]["mCE"] != 1.0 or rows[0]["knn"] != rows[1]["knn"]


def test_report_defaults_to_the_runs_folder_and_states_the_counts_it_used(mae_run, fmnist_small):
    assert main(["eval", "report", str(mae_run), "--protocols", "knn", "--data", f"idx:{fmnist_small}",
                 "--train-limit", "100000", "--test-limit", "50"]) == 0
    report = (mae_run / "report" / "report.md").read_text()
    assert "probes trained on 2048 train images, measured on 50 test images" in report   # 2,048 exist, not 100,000


def test_fid_and_inception_score_from_a_local_inception_weights_file(tmp_path, fmnist_small, monkeypatch):
    """No weights can be downloaded here: make an Inception-v3 file in torch-fidelity's format (random weights)
    and check that FID and IS are computed from it (FID of an identity reconstruction ~ 0)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
    torch.manual_seed(0)
    net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(torch.nn.Module.state_dict(net), tmp_path / "inception.pth")
    monkeypatch.undo()

    class Identity(torch.nn.Module):
        def reconstruction_rows(self, images):
            return [("original", images), ("reconstruction", images.clone())]

    test = build_dataset(f"idx:{fmnist_small}", "test")
    m = reconstruction_metrics(Identity(), test, [28, 28], [0.286], [0.353], num_images=40, batch_size=20,
                               inception_weights=str(tmp_path / "inception.pth"))
    assert abs(m["fid"]) < 1e-2 and m["inception_score"] >= 1.0 and "Inception-v3" in m["feature_network"]


def test_cls_attention_matches_the_blocks_own_attention():
    """The recomputed CLS attention reproduces timm's fused attention output for the CLS token."""
    from mimkit.eval.attention import cls_attention
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **VIT).eval()
    images = torch.randn(2, 1, 28, 28)
    weights = cls_attention(model, images)                                   # [B, H, L] over patches only
    assert weights.shape == (2, 4, 49) and (weights.sum(-1) < 1).all()      # the CLS's share of itself is left out
    captured = {}
    block = model.blocks[-1]
    hook = block.norm1.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    model.forward_features(images)
    hook.remove()
    x = captured["x"]
    attn = block.attn
    qkv = attn.qkv(x).reshape(2, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)
    full = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)
    assert torch.allclose(full[:, :, 0, 1:], weights, atol=1e-6)
    cls_out = attn.proj((full[:, :, :1] @ qkv[2]).transpose(1, 2).reshape(2, 1, 64))
    assert torch.allclose(cls_out[:, 0], attn(x)[:, 0], atol=1e-5)
