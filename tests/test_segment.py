"""Segmentation transfer (issue 25): scores against a hand-made confusion matrix, the pyramid's maps from the blocks
the recipe names, ADE20K's label shift, bad segmentation data, a tiny run whose mIoU rises above the all-background
baseline, exact resume, and the ViT-B ADE20K recipe running an iteration at 512x512."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data.datasets import DataError
from mimkit.data.segmentation import SegmentationFolder, make_segmentation
from mimkit.eval.encoders import probe_subject
from mimkit.eval.pyramid import ResNetPyramid, ViTPyramid
from mimkit.eval.segment import (CPU_RECIPE, Segmenter, confusion_matrix, count_parameters, dense_encoder,
                                 load_segment_recipe, segmentation_scores, train_segmenter)
from tests.conftest import REPO
from tests.test_cli import error_of

TINY_RECIPE = str(CPU_RECIPE)
MAE_TINY = str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml")


def test_scores_equal_a_confusion_matrix_counted_by_hand():
    target = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 3], [1, 2, 0, 0]])      # the 3 falls on an ignored pixel: class 3 is absent
    confusion = confusion_matrix(pred, target, 4, 255)
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion, ["a", "b", "c", "d"])
    # IoU: a 2 / (3 + 3 - 2) = 0.5, b 2 / (2 + 3 - 2) = 2/3, c 1 / (2 + 1 - 1) = 0.5, d absent from both: left out
    assert scores["per_class_iou"] == {"a": 50.0, "b": 66.67, "c": 50.0, "d": None}
    assert scores["miou"] == round(100 * (0.5 + 2 / 3 + 0.5) / 3, 2)
    assert scores["pixel_acc"] == round(100 * 5 / 7, 2)


def hooked_outputs(modules, run):
    seen = {}
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out)) for i, m in enumerate(modules)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_the_vit_pyramid_takes_the_named_blocks_at_strides_4_8_16_32():
    vit = timm.create_model("vit_base_patch16_224", img_size=64, embed_dim=32, depth=12, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    pyramid = ViTPyramid(vit, [4, 6, 8, 12]).eval()
    x = torch.randn(2, 3, 128, 96)
    seen = hooked_outputs(vit.blocks, lambda: pyramid(x))
    maps = pyramid(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 24), (16, 12), (8, 6), (4, 3)]     # 128x96 / 4, 8, 16, 32
    assert pyramid.strides == [4, 8, 16, 32]
    grid = [seen[b - 1][:, 1:].transpose(1, 2).reshape(2, 32, 8, 6) for b in (4, 6, 8, 12)]  # tokens of blocks 4..12
    assert torch.equal(maps[2], grid[2])                                                # x1: block 8 as it is
    assert torch.equal(maps[3], torch.nn.functional.max_pool2d(grid[3], 2))             # x1/2: block 12, pooled
    assert torch.allclose(maps[1], pyramid.resample[1](grid[1]))                        # x2: block 6, deconvolved
    assert torch.allclose(maps[0], pyramid.resample[0](grid[0]))                        # x4: block 4
    assert not torch.allclose(maps[1], pyramid.resample[1](grid[2]))                    # and not another block's


def test_the_resnet_pyramid_takes_its_four_stages():
    net = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=[32, 64, 128, 256], stem_width=32, num_classes=0)
    pyramid = ResNetPyramid(net).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = hooked_outputs([net.layer1, net.layer2, net.layer3, net.layer4], lambda: pyramid(x))
    maps = pyramid(x)
    assert pyramid.strides == [4, 8, 16, 32] and [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    assert all(torch.equal(m, seen[i]) for i, m in enumerate(maps))


def write_pair(images, labels, stem, image, label, suffix=".png"):
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(images / f"{stem}{suffix}")
    Image.fromarray(label).save(labels / f"{stem}.png")


def test_ade20k_labels_read_back_with_0_ignored_and_1_to_150_as_0_to_149(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    label = np.array([[0, 1, 2], [150, 75, 0]], np.uint8)
    for split in ("training", "validation"):
        write_pair(root / "images" / split, root / "annotations" / split, "ADE_1",
                   np.zeros((2, 3, 3), np.uint8), label, ".jpg")
    data = SegmentationFolder(root, "train")
    assert data.layout == "ade20k" and data.num_classes == 150
    assert data[0][1].tolist() == [[255, 0, 1], [149, 74, 255]]
    Image.fromarray(np.array([[151, 1]], np.uint8)).save(root / "annotations" / "training" / "ADE_2.png")
    Image.fromarray(np.zeros((1, 2, 3), np.uint8)).save(root / "images" / "training" / "ADE_2.jpg")
    with pytest.raises(DataError, match="holds label 151, beyond the 150 classes"):
        SegmentationFolder(root, "train")[1]


@pytest.fixture(scope="module")
def canvases(fmnist_small, tmp_path_factory):
    """A small benchmark: 32x32 canvases, 256 train / 48 val."""
    out = tmp_path_factory.mktemp("seg") / "bench"
    make_segmentation(out, f"idx:{fmnist_small}", canvas=32, train_count=256, val_count=48, scale=(0.6, 1.0))
    return out


def test_make_segmentation_writes_labels_that_match_the_items(canvases, fmnist_small):
    data = SegmentationFolder(canvases, "val")
    assert len(data) == 48 and data.classes[0] == "background" and data.num_classes == 11
    image, label = data[0]
    assert image.shape == (1, 32, 32) and label.shape == (32, 32)
    assert torch.equal(label > 0, image[0] > 25)                     # foreground where the items' pixels are
    again = make_segmentation(canvases.parent / "again", f"idx:{fmnist_small}", canvas=32, train_count=256,
                              val_count=48, scale=(0.6, 1.0))
    assert again["seed"] == 0 and (canvases / "val/labels/000007.png").read_bytes() == \
        (canvases.parent / "again/val/labels/000007.png").read_bytes()          # seeded


@pytest.mark.parametrize("damage, sentence", [
    ("no label", "have no label map"),
    ("other size", "label maps must match their images pixel for pixel"),
    ("beyond classes", "holds label 12, beyond the 11 classes declared in classes.json"),
])
def test_bad_segmentation_data_is_one_sentence(capsys, tmp_path, canvases, damage, sentence):
    import shutil
    bench = tmp_path / "bench"
    shutil.copytree(canvases, bench)
    if damage == "no label":
        (bench / "train/labels/000003.png").unlink()
    elif damage == "other size":
        Image.fromarray(np.zeros((31, 32), np.uint8)).save(bench / "train/labels/000000.png")
    else:
        Image.fromarray(np.full((32, 32), 12, np.uint8)).save(bench / "val/labels/000000.png")
    err = error_of(capsys, ["eval", "segment", "--config", MAE_TINY, "--random-init", "--data", f"seg:{bench}",
                            "--recipe", TINY_RECIPE, "--steps", "1", "--set", "batch_size=4", "--set", "crop_size=[32,32]",
                            "--set", "resize_short=32", "--out", str(tmp_path / "run")])
    assert sentence in err


def tiny_segmenter(canvases, **overrides):
    from mimkit.eval.encoders import probe_subject
    cfg = load_segment_recipe(TINY_RECIPE, [f"{k}={v}" for k, v in {
        "crop_size": "[32,32]", "resize_short": 32, "batch_size": 8, "num_workers": 0, "blocks": "[1,2,3,4]",
        **overrides}.items()])
    subject = probe_subject(None, MAE_TINY, None, True, False, ["model.size=pico"], in_chans=1)
    encoder = dense_encoder(*subject.timm_spec, subject.model.state_dict(), cfg.drop_path, cfg.output_stride,
                            cfg.crop_size)
    model = Segmenter(encoder, 11, cfg)
    data = SegmentationFolder(canvases, "train"), SegmentationFolder(canvases, "val")
    return model, cfg, data, (data[0].mean, data[0].std)


def test_a_tiny_run_raises_miou_above_the_all_background_baseline(canvases, tmp_path):
    from mimkit.eval.segment import evaluate
    torch.manual_seed(0)
    model, cfg, (train, val), (mean, std) = tiny_segmenter(canvases, steps=90, eval_every=30, warmup_steps=10,
                                                           log_every=10)
    untrained = evaluate(model, val, torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1),
                         cfg)["miou"]
    result = train_segmenter(model, train, val, mean, std, cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    curve = [untrained] + [r["val/miou"] for r in rows if "val/miou" in r]
    labels = torch.cat([val[i][1].flatten() for i in range(len(val))])
    baseline = 100 * (labels == 0).double().mean().item() / len(labels.unique())   # all background: its IoU, averaged
    assert len(curve) == 4 and result["miou"] == curve[-1] > curve[0] and curve[-1] > baseline + 4, (curve, baseline)
    assert result["per_class_iou"]["background"] > 80
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]


def test_resume_of_a_segmentation_run_reproduces_the_uninterrupted_losses(canvases, tmp_path):
    settings = dict(steps=8, eval_every=100, ckpt_every=100, log_every=1, warmup_steps=2)
    torch.manual_seed(0)
    model, cfg, (train, val), (mean, std) = tiny_segmenter(canvases, **settings)
    train_segmenter(model, train, val, mean, std, cfg, tmp_path / "full", quiet=True, val_limit=4)
    torch.manual_seed(0)
    model, cfg, *_ = tiny_segmenter(canvases, **settings)
    train_segmenter(model, train, val, mean, std, cfg, tmp_path / "cut", quiet=True, stop_after=3, val_limit=4)
    torch.manual_seed(1)                                     # a resumed process starts from other weights and RNG
    model, cfg, *_ = tiny_segmenter(canvases, **settings)
    train_segmenter(model, train, val, mean, std, cfg, tmp_path / "cut", resume=True, quiet=True, val_limit=4)

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 9))
    assert all(abs(full[s] - cut[s]) < 1e-5 for s in full), (full, cut)


def test_the_vit_b_ade20k_recipe_runs_an_iteration_at_512(capsys, tmp_path):
    root = tmp_path / "ade-like"
    rng = np.random.default_rng(0)
    (root).mkdir()
    (root / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(150)], "ignore_index": 255}))
    for split in ("train", "val"):
        write_pair(root / split / "images", root / split / "labels", "a",
                   rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), rng.integers(0, 150, (512, 512), dtype=np.uint8))
    cfg = load_segment_recipe(REPO / "configs/segment/upernet_vit-b16_ade20k-160k.yaml",
                              ["batch_size=1", "decoder_norm=identity", "num_workers=0", "log_every=1"])
    subject = probe_subject(None, str(REPO / "configs/mae_vit-b16_in1k-800e.yaml"), None, True, False, [], in_chans=3)
    model = Segmenter(dense_encoder(*subject.timm_spec, subject.model.state_dict(), cfg.drop_path, cfg.output_stride,
                                    cfg.crop_size), 150, cfg)
    params = count_parameters(model)
    assert params["encoder"] == 85_798_656 and params["head"] > 10_000_000
    train, out = SegmentationFolder(root, "train"), tmp_path / "run"
    # stopped after one iteration as a crash would: no evaluation (UperNet at 512 px costs minutes on the CPU; the
    # resume and the loss falling are tested on the tiny recipe)
    assert train_segmenter(model, train, train, train.mean, train.std, cfg, out, stop_after=1, quiet=True)["steps"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    assert (out / "last.pt").is_file()


def test_eval_report_adds_the_miou_column(capsys, tmp_path, fmnist_small):
    run = tmp_path / "mae"
    assert main(["pretrain", "--config", MAE_TINY, "--out", str(run), "--data", f"idx:{fmnist_small}", "--steps", "2",
                 "data.batch_size=16", "data.num_workers=0", "train.sample_every=0"]) == 0
    make_segmentation(tmp_path / "canvases", f"idx:{fmnist_small}", canvas=64, train_count=16, val_count=4)
    assert main(["eval", "report", str(run), "--protocols", "knn,segment", "--data", f"idx:{fmnist_small}",
                 "--train-limit", "64", "--test-limit", "32", "--segment-data", f"seg:{tmp_path / 'canvases'}",
                 "--segment-steps", "2", "--out", str(tmp_path / "report")]) == 0
    row = json.loads((tmp_path / "report/report.json").read_text())[0]
    table = (tmp_path / "report/report.md").read_text()
    assert "| run | k-NN | mIoU | pixel acc. |" in table and f"| {row['segment']['miou']:.2f} |" in table
    assert row["segment"]["steps"] == 2 and (tmp_path / "report" / row["segment_png"]).is_file()
    assert main(["eval", "report", str(run), "--protocols", "segment", "--data", f"idx:{fmnist_small}"]) == 2
    assert main(["export", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "enc")]) == 0   # an export too
    capsys.readouterr()
    assert main(["eval", "segment", "--ckpt", str(tmp_path / "enc.safetensors"), "--data", f"seg:{tmp_path / 'canvases'}",
                 "--recipe", TINY_RECIPE, "--steps", "1", "--set", "num_workers=0", "--out", str(tmp_path / "s")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["encoder"].startswith("export") and (tmp_path / "s/tb").is_dir()


def test_layer_decay_reaches_the_encoder_blocks_with_the_recipe_factor(canvases):
    from mimkit.eval.segment import param_groups
    model, cfg, *_ = tiny_segmenter(canvases, layer_decay=0.5)
    depth = len(model.encoder.blocks)
    scale_of = {id(p): g["lr_scale"] for g in param_groups(model, cfg) for p in g["params"]}
    for i, block in enumerate(model.encoder.blocks):            # BEiT's rule: block i at decay^(depth - i)
        assert {scale_of[id(p)] for p in block.parameters()} == {0.5 ** (depth - i)}
    assert scale_of[id(model.encoder.patch_embed.proj.weight)] == 0.5 ** (depth + 1)
    assert scale_of[id(model.encoder.norm.weight)] == 1.0 and {scale_of[id(p)] for p in model.head_parameters()} == {1.0}
    decays = {id(p): g["weight_decay"] for g in param_groups(model, cfg) for p in g["params"]}
    assert decays[id(model.encoder.pos_embed)] == decays[id(model.encoder.blocks[0].norm1.weight)] == 0.0
    assert decays[id(model.encoder.blocks[0].attn.qkv.weight)] == cfg.weight_decay


def test_a_frozen_linear_probe_trains_the_head_only(canvases, tmp_path):
    model, cfg, (train, val), (mean, std) = tiny_segmenter(canvases, head="linear", frozen="true", steps=3,
                                                           eval_every=100, warmup_steps=0)
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    train_segmenter(model, train, val, mean, std, cfg, tmp_path / "run", quiet=True, val_limit=2)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not torch.equal(head["1.weight"], model.classifier.state_dict()["1.weight"])


def test_fcn_on_a_dilated_resnet_trains_end_to_end(canvases, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "segment", "--config", str(REPO / "configs/cim-respix_resnet-mini_fmnist-tiny.yaml"),
                 "--random-init", "--data", f"seg:{canvases}", "--recipe",
                 str(REPO / "configs/segment/fcn_resnet50_ade20k-cim.yaml"), "--steps", "2", "--set", "batch_size=4",
                 "--set", "crop_size=[32,32]", "--set", "resize_short=32", "--set", "num_workers=0", "--set",
                 "log_every=1", "--val-limit", "2", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["head"] == "fcn" and result["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_sliding_windows_cover_the_image_and_average_overlaps():
    """A model that answers with a constant per window: the prediction is the windows' average per pixel."""
    from mimkit.eval.segment import SegmentConfig, predict

    class Counter(torch.nn.Module):
        size_multiple, calls = 1, []

        def forward(self, x):
            self.calls.append(tuple(x.shape[-2:]))
            return torch.stack([torch.zeros_like(x[:, 0]), torch.full_like(x[:, 0], float(len(self.calls)))], 1)

    cfg = SegmentConfig(crop_size=[4, 4], slide_stride=[3, 3], resize_short=None, inference="slide")
    model = Counter()
    pred = predict(model, torch.zeros(1, 7, 10, dtype=torch.uint8), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), cfg)
    assert pred.shape == (7, 10) and model.calls == [(4, 4)] * 6       # windows at rows 0, 3 and columns 0, 3, 6
    assert pred.eq(1).all()


def test_a_relative_position_encoder_is_rebuilt_at_the_crop_size(canvases, tmp_path):
    from mimkit.eval.encoders import probe_subject
    subject = probe_subject(None, str(REPO / "configs/simmim_vit-mini_fmnist-tiny.yaml"), None, True, False,
                            ["model.position=shared_relative"], in_chans=1)
    assert subject.timm_spec[0].startswith("beit")
    cfg = load_segment_recipe(TINY_RECIPE, ["crop_size=[48,48]", "inference=slide", "slide_stride=[16,16]"])
    encoder = dense_encoder(*subject.timm_spec, subject.model.state_dict(), cfg.drop_path, cfg.output_stride,
                            cfg.crop_size)
    table = encoder.rel_pos_bias.relative_position_bias_table
    assert table.shape[0] == (2 * 12 - 1) ** 2 + 3 != subject.model.rel_pos_bias.relative_position_bias_table.shape[0]
    model = Segmenter(encoder, 11, cfg).eval()
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 11, 48, 48)


@pytest.mark.parametrize("recipe, config, encoder, head", [
    ("upernet_vit-b16_ade20k-160k", "mae_vit-b16_in1k-800e", 85_798_656, 76_407_852),      # 162 M: UperNet ViT-B
    ("linear_vit-b16_ade20k-cim", "mae_vit-b16_in1k-800e", 85_798_656, 116_886),           # BN + 1x1 to 150
    ("fcn_resnet50_ade20k-cim", "cim-respix_resnet50_in1k-300e", 23_508_032, 11_913_516),   # torchvision FCNHead
])
def test_each_ade20k_recipe_builds_its_model_at_the_shipped_settings(recipe, config, encoder, head):
    from mimkit.eval.encoders import probe_subject
    from mimkit.eval.segment import count_parameters
    cfg = load_segment_recipe(REPO / "configs/segment" / f"{recipe}.yaml")
    subject = probe_subject(None, str(REPO / "configs" / f"{config}.yaml"), None, True, False, [], in_chans=3)
    net = dense_encoder(*subject.timm_spec, subject.model.state_dict(), cfg.drop_path, cfg.output_stride, cfg.crop_size)
    model = Segmenter(net, 150, cfg)
    assert count_parameters(model) == {"encoder": encoder, "head": head}
    assert cfg.inference == "slide" and cfg.crop_size == [512, 512] and cfg.batch_size == 16 and cfg.steps == 160_000


def test_the_dense_encoder_holds_the_given_weights():
    """The encoder rebuilt for dense inputs carries every tensor of the state it was given (ViT: unchanged; Beit:
    everything but the relative position tables, which timm resizes to the crop)."""
    from mimkit.eval.encoders import probe_subject
    for config, crop, extra in (("mae_vit-mini_fmnist-tiny", [64, 64], []),
                                ("simmim_vit-mini_fmnist-tiny", [48, 48], ["model.position=shared_relative"])):
        subject = probe_subject(None, str(REPO / "configs" / f"{config}.yaml"), None, True, False, extra, in_chans=1)
        state = subject.model.state_dict()
        cfg = load_segment_recipe(TINY_RECIPE, [f"crop_size=[{crop[0]},{crop[1]}]", "inference=slide"])
        rebuilt = dense_encoder(*subject.timm_spec, state, cfg.drop_path, cfg.output_stride, crop).state_dict()
        kept = [k for k in state if "relative_position" not in k]
        assert kept and all(torch.equal(rebuilt[k], state[k]) for k in kept)
        assert set(rebuilt) == set(state)
