"""eval detect: COCO AP through pycocotools, the pyramid that feeds the FPN, layer decay, the COCO reader and writer,
bad annotations, a tiny run that learns, exact resume, and the ViT-B recipe at its shipped settings."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data.detection import CocoDetection, encode_mask, make_detection, quiet_coco
from mimkit.data.segmentation import canvas_splits
from mimkit.eval.dense import dense_encoder
from mimkit.eval.detect import (CPU_RECIPE, RECIPES, build_detector, coco_results, coco_scores, detection_encoder,
                                learning_rate, load_detect_recipe, param_groups, train_detector)
from mimkit.eval.encoders import probe_subject

REPO = Path(__file__).resolve().parents[1]
MAE_TINY = str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml")
MAE_B = str(REPO / "configs/mae_vit-b16_in1k-800e.yaml")


def box_mask(x, y, w, h, size=64) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


def ground_truth(boxes, crowd=(), category_ids=(3, 7)) -> object:
    """One 64x64 image; `boxes`: (x, y, w, h, category id); `crowd`: the same, marked iscrowd."""
    annotations = [{"id": k + 1, "image_id": 1, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                    "iscrowd": int(k >= len(boxes)), "segmentation": encode_mask(box_mask(x, y, w, h))}
                   for k, (x, y, w, h, c) in enumerate(list(boxes) + list(crowd))]
    return quiet_coco(dataset={"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
                               "annotations": annotations,
                               "categories": [{"id": c, "name": f"c{c}"} for c in category_ids]})


def output(boxes, scores, labels) -> dict:
    """A MaskRCNN output in torchvision's form: x1y1x2y2 boxes, labels 1..K, masks [N, 1, H, W] of probabilities."""
    masks = torch.stack([torch.from_numpy(box_mask(*b)).float() for b in boxes])[:, None] * 0.9
    return {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32),
            "scores": torch.tensor(scores), "labels": torch.tensor(labels), "masks": masks}


def test_coco_ap_is_one_for_perfect_predictions_and_drops_as_pycocotools_counts_shifts():
    gt = ground_truth([(10, 10, 10, 10, 7)])
    category_ids = [3, 7]                          # label 2 is category 7: the mapping back is exercised
    perfect = coco_scores(gt, coco_results(output([(10, 10, 10, 10)], [0.9], [2]), 1, category_ids))
    assert perfect["box"]["ap"] == 100.0 and perfect["mask"]["ap"] == 100.0
    # 1 px right: IoU 90/110 = 0.818, a match at the thresholds 0.50..0.80 (7 of 10) -> AP 70, AP75 100
    shifted = coco_scores(gt, coco_results(output([(11, 10, 10, 10)], [0.9], [2]), 1, category_ids))
    assert (shifted["box"]["ap"], shifted["box"]["ap50"], shifted["box"]["ap75"]) == (70.0, 100.0, 100.0)
    assert shifted["mask"]["ap"] == 70.0
    # 3 px: IoU 70/130 = 0.538, a match at 0.50 only -> AP 10, AP75 0
    far = coco_scores(gt, coco_results(output([(13, 10, 10, 10)], [0.9], [2]), 1, category_ids))
    assert (far["box"]["ap"], far["box"]["ap50"], far["box"]["ap75"]) == (10.0, 100.0, 0.0)
    wrong_class = coco_scores(gt, coco_results(output([(10, 10, 10, 10)], [0.9], [1]), 1, category_ids))
    assert wrong_class["box"]["ap"] == 0.0
    assert coco_scores(gt, [])["box"]["ap"] == 0.0


def test_crowd_regions_are_ignored_as_coco_ignores_them():
    gt = ground_truth([(5, 5, 12, 12, 3)], crowd=[(30, 30, 30, 30, 3)])
    on_crowd = output([(5, 5, 12, 12), (32, 32, 20, 20)], [0.9, 0.95], [1, 1])
    assert coco_scores(gt, coco_results(on_crowd, 1, [3, 7]))["box"]["ap"] == 100.0   # not a false positive
    missed_crowd = output([(5, 5, 12, 12)], [0.9], [1])
    assert coco_scores(gt, coco_results(missed_crowd, 1, [3, 7]))["box"]["ap"] == 100.0   # not a missed object


def vit_detector(recipe, **overrides):
    cfg = load_detect_recipe(recipe, [f"{k}={v}" for k, v in overrides.items()])
    config = MAE_B if "vit-b16" in str(recipe) else MAE_TINY
    subject = probe_subject(None, config, None, True, False, [], in_chans=3 if config == MAE_B else 1, seed=0)
    encoder = dense_encoder(*subject.timm_spec, subject.model.state_dict(), cfg.drop_path)
    channels = encoder.patch_embed.proj.in_channels
    return build_detector(encoder, None, 80, [0.5] * channels, [0.25] * channels, cfg), cfg


def test_the_vit_adaptor_feeds_the_fpn_the_named_blocks_at_strides_4_8_16_32():
    model, cfg = vit_detector(RECIPES / "maskrcnn_vit-b16_coco-1x.yaml")
    assert cfg.blocks == [4, 6, 8, 12]
    model.eval()
    encoder, body = model.backbone.body.encoder, model.backbone.body
    blocks, fed = {}, {}
    for i, block in enumerate(encoder.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: blocks.__setitem__(i, out))
    for k, inner in enumerate(model.backbone.fpn.inner_blocks):
        inner.register_forward_pre_hook(lambda m, a, k=k: fed.__setitem__(k, a[0]))
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        model.backbone(x)
    assert [tuple(fed[k].shape[-2:]) for k in range(4)] == [(32, 48), (16, 24), (8, 12), (4, 6)]   # strides 4..32

    def patch_map(i):                              # block i's tokens (after the class token) as a [1, C, 8, 12] map
        return blocks[i][:, encoder.num_prefix_tokens:].transpose(1, 2).reshape(1, -1, 8, 12)
    with torch.no_grad():
        assert torch.allclose(fed[0], body.resample[0](patch_map(3)), atol=1e-5)     # block 4, x4
        assert torch.allclose(fed[1], body.resample[1](patch_map(5)), atol=1e-5)     # block 6, x2
        assert torch.equal(fed[2], patch_map(7))                                     # block 8, x1
        assert torch.equal(fed[3], torch.nn.functional.max_pool2d(patch_map(11), 2))  # block 12, x1/2
    simple, _ = vit_detector(RECIPES / "maskrcnn_vit-b16_coco-1x.yaml", pyramid="simple", blocks="null")
    assert simple.backbone.body.indices == [11, 11, 11, 11]                          # ViTDet's: the last block only


def test_a_resnet_feeds_the_fpn_its_four_stages():
    import timm
    encoder = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model = build_detector(encoder, None, 5, [0.5] * 3, [0.25] * 3, load_detect_recipe(CPU_RECIPE, ["blocks=null"])).eval()
    stages, fed = {}, {}
    for k, name in enumerate(["layer1", "layer2", "layer3", "layer4"]):
        getattr(encoder, name).register_forward_hook(lambda m, a, out, k=k: stages.__setitem__(k, out))
        model.backbone.fpn.inner_blocks[k].register_forward_pre_hook(lambda m, a, k=k: fed.__setitem__(k, a[0]))
    with torch.no_grad():
        model.backbone(torch.randn(1, 3, 128, 128))
    assert [fed[k].shape[-1] for k in range(4)] == [32, 16, 8, 4]
    assert all(torch.equal(fed[k], stages[k]) for k in range(4))


def test_a_relative_position_encoder_gets_every_input_padded_to_its_one_size():
    subject = probe_subject(None, str(REPO / "configs/simmim_vit-mini_fmnist-tiny.yaml"), None, True, False,
                            ["model.position=shared_relative"], in_chans=1)
    cfg = load_detect_recipe(CPU_RECIPE)
    encoder, fixed = detection_encoder(subject.timm_spec, subject.model.state_dict(), cfg)
    assert subject.timm_spec[0].startswith("beit") and fixed == (64, 64)
    model = build_detector(encoder, fixed, 10, [0.5], [0.25], cfg).eval()
    seen, fed = [], {}
    encoder.patch_embed.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    model.backbone.fpn.inner_blocks[2].register_forward_pre_hook(lambda m, a: fed.__setitem__(2, a[0]))
    with torch.no_grad():
        model([torch.rand(1, 48, 56)])                 # resized to 55x64 (long side 64), padded to 56x64 by torchvision
    assert seen == [(64, 64)] and tuple(fed[2].shape[-2:]) == (14, 16)      # padded to 64x64, maps cut to 56x64 / 4


def test_layer_decay_reaches_the_encoder_blocks_with_the_recipe_factors():
    model, cfg = vit_detector(RECIPES / "maskrcnn_vit-b16_coco-1x.yaml")
    scale_of = {id(p): g["lr_scale"] for g in param_groups(model, cfg) for p in g["params"]}
    encoder = model.backbone.body.encoder
    assert len(scale_of) == sum(1 for _ in model.parameters())                     # every parameter, once
    for i, block in enumerate(encoder.blocks):                                     # block i+1 at 0.75^(12 - i)
        assert [scale_of[id(p)] for p in block.parameters()] == pytest.approx([0.75 ** (12 - i)] * 12)
    assert scale_of[id(encoder.patch_embed.proj.weight)] == pytest.approx(0.75 ** 13)
    assert {scale_of[id(p)] for p in model.roi_heads.parameters()} == {1.0}
    assert {scale_of[id(p)] for p in model.backbone.fpn.parameters()} == {1.0}


def test_a_short_run_drops_the_lr_at_its_share_of_the_schedule():
    cfg = load_detect_recipe(RECIPES / "maskrcnn_vit-b16_coco-1x.yaml", ["warmup_steps=4", "steps=24"])
    lrs = [learning_rate(s, 24, cfg) for s in range(24)]
    assert lrs[0] == pytest.approx(3e-4 * 0.001) and lrs[2] == pytest.approx(3e-4 * (1 - 0.999 * 0.5))
    assert lrs[4] == lrs[17] == pytest.approx(3e-4)                   # drops at epochs 9 and 11 of 12: steps 18, 22
    assert lrs[18] == pytest.approx(3e-5) and lrs[22] == pytest.approx(3e-6)
    cosine = load_detect_recipe(RECIPES / "maskrcnn_vit-b16_coco-768.yaml", ["warmup_steps=0"])
    assert learning_rate(50, 100, cosine) == pytest.approx(1.6e-4 / 2)


def test_the_recipes_state_the_papers_values():
    cae = load_detect_recipe(RECIPES / "maskrcnn_vit-b16_coco-1x.yaml")
    assert (cae.lr, cae.batch_size, cae.max_size, cae.epochs) == (3e-4, 32, 1333, 12)          # CAE's appendix
    assert (cae.train_sizes[0], cae.train_sizes[-1], cae.test_size) == (480, 800, 800)
    assert (cae.layer_decay, cae.drop_path, cae.lr_drops, cae.box_head) == (0.75, 0.2, [9, 11], "4conv1fc")
    ve = load_detect_recipe(RECIPES / "maskrcnn_vit-b16_coco-768.yaml")
    assert (ve.max_size, ve.test_size, ve.jitter, ve.schedule, ve.epochs) == (768, 768, [0.1, 2.0], "cosine", 25)
    with pytest.raises(ValueError, match="anchor_sizes"):
        load_detect_recipe(CPU_RECIPE, ["anchor_sizes=[8,16]"])


def test_the_made_benchmark_reads_back_with_every_box_and_mask(fmnist_small, tmp_path):
    made = make_detection(tmp_path / "coco", f"idx:{fmnist_small}", canvas=48, train_count=6, val_count=5, seed=3)
    expected = {split: list(canvases) for split, _, canvases in
                canvas_splits(f"idx:{fmnist_small}", 48, 6, 5, (1, 4), (0.75, 1.5), 3)}
    for split in ("train", "val"):
        found = CocoDetection(tmp_path / "coco", split)
        assert len(found) == made[split] == len(expected[split]) and found.classes[0] == "T-shirt/top"
        total = 0
        for i, (image, placed) in enumerate(expected[split]):
            got_image, target = found[i]
            assert torch.equal(got_image[0], torch.from_numpy(image))
            visible = [(c, m) for c, m in placed if m.any()]
            assert target["labels"].tolist() == [c + 1 for c, _ in visible]
            for k, (_, mask) in enumerate(visible):
                assert torch.equal(target["masks"][k], torch.from_numpy(mask.astype(np.uint8)))
                rows, cols = np.nonzero(mask)
                assert target["boxes"][k].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            total += len(visible)
        assert total == made[f"{split}_instances"]


def write_coco(root: Path, annotations: list[dict], images=({"id": 1, "file_name": "a.png"},), size=32):
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for image in images:
        Image.fromarray(np.full((size, size), 128, np.uint8)).save(root / "train" / image["file_name"])
    (root / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"width": size, "height": size, **im} for im in images],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, **a}
                        for k, a in enumerate(annotations)],
        "categories": [{"id": 1, "name": "thing"}]}))


def test_polygons_and_rle_masks_read_and_what_coco_skips_is_counted(tmp_path):
    square = [4, 4, 14, 4, 14, 14, 4, 14]                             # a 10 x 10 square as a polygon
    write_coco(tmp_path, [
        {"bbox": [4, 4, 10, 10], "segmentation": [square]},
        {"bbox": [16, 16, 8, 8], "segmentation": encode_mask(box_mask(16, 16, 8, 8, 32))},
        {"bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1]]},       # a polygon of two points
        {"bbox": [2, 2, 0, 4], "segmentation": [square]},             # a box of zero width
        {"bbox": [0, 0, 32, 32], "segmentation": [square], "iscrowd": 1}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = CocoDetection(tmp_path, "train")
    message = " ".join(str(w.message) for w in caught)
    assert "1 crowd regions" in message and "1 boxes of zero size" in message
    assert "1 polygons of fewer than 3 points" in message and "1 annotations left without a polygon" in message
    _, target = found[0]
    assert len(target["masks"]) == 2 and int(target["masks"][1].sum()) == 64
    assert torch.equal(target["masks"][1], torch.from_numpy(box_mask(16, 16, 8, 8, 32)))
    assert 90 <= int(target["masks"][0].sum()) <= 121                # pycocotools' rasterised square


@pytest.mark.parametrize("case, change, words", [
    ("missing image id", {"image_id": 9}, "is for image id 9, which the file's 'images' does not list"),
    ("unknown category", {"category_id": 5}, "has category id 5, not one of the file's categories [1]"),
    ("box outside", {"bbox": [20, 20, 30, 30]}, "lies outside its image a.png (32x32); fix the box"),
])
def test_bad_annotations_stop_with_one_sentence(tmp_path, capsys, case, change, words):
    write_coco(tmp_path / "c", [{"bbox": [4, 4, 10, 10], "segmentation": [[4, 4, 14, 4, 14, 14]], **change}])
    code = main(["eval", "detect", "--config", MAE_TINY, "--random-init", "--data", f"coco:{tmp_path / 'c'}",
                 "--recipe", str(CPU_RECIPE), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err and err.count("\n") == 1, err


def test_a_missing_image_file_and_a_missing_layout_are_named(tmp_path, capsys):
    write_coco(tmp_path / "c", [{"bbox": [4, 4, 10, 10], "segmentation": [[4, 4, 14, 4, 14, 14]]}],
               images=({"id": 1, "file_name": "a.png"},))
    (tmp_path / "c" / "train" / "a.png").unlink()
    argv = ["eval", "detect", "--config", MAE_TINY, "--random-init", "--recipe", str(CPU_RECIPE), "--out",
            str(tmp_path / "r"), "--data"]
    assert main(argv + [f"coco:{tmp_path / 'c'}"]) == 2
    assert "1 image(s) listed in instances_train.json are not in" in capsys.readouterr().err
    assert main(argv + [f"coco:{tmp_path / 'nothing'}"]) == 2
    assert "mimkit data make-detection --out DIR" in capsys.readouterr().err


@pytest.fixture(scope="module")
def canvases(fmnist_small, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detect") / "coco"
    make_detection(root, f"idx:{fmnist_small}", canvas=64, train_count=160, val_count=24)
    return root


def test_a_tiny_detection_run_learns(canvases, tmp_path, capsys):
    """The CPU recipe as shipped but shorter (80 iterations, its lr drops included): the loss falls and box AP50
    ends above 5 (an untrained detector scores about 0 here)."""
    out = tmp_path / "run"
    assert main(["eval", "detect", "--config", MAE_TINY, "--random-init", "--data", f"coco:{canvases}",
                 "--recipe", str(CPU_RECIPE), "--steps", "80", "--set", "num_workers=0", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(rows[0])
    assert result["box_ap50"] > 5 and result["steps"] == 80 and (out / "detect-examples.png").is_file()
    assert any("val/box_ap" in r for r in rows) and (out / "tb").is_dir()


def test_resume_reproduces_the_uninterrupted_losses(canvases, tmp_path):
    from mimkit.data.detection import detection_split
    train, val = detection_split(f"coco:{canvases}", "train"), detection_split(f"coco:{canvases}", "val")

    def run(out, stop_after=None, resume=False):
        model, cfg = vit_detector(CPU_RECIPE, steps=5, log_every=1, num_workers=0, batch_size=2, warmup_steps=2)
        train_detector(model, train, val, cfg, out, resume=resume, stop_after=stop_after, quiet=True, val_limit=2)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=3)
    resumed = run(tmp_path / "b", resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(whole[3:], resumed[3:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["loss_mask"] == pytest.approx(a["loss_mask"], abs=1e-5)
    with pytest.raises(FileExistsError, match="pass --resume"):
        run(tmp_path / "a")


def test_the_vit_b_coco_recipe_runs_an_iteration_on_1024_px_input(tmp_path):
    """CAE's 1x recipe as shipped (multi-scale resize, 4conv1fc head, layer decay) at batch 1 on one synthetic
    1024x1024 image with two objects; stopped after one iteration, as a crash would (no evaluation)."""
    rng = np.random.default_rng(0)
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "annotations").mkdir()
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(tmp_path / "c" / "train" / "a.png")
    boxes = [(100, 200, 300, 250), (600, 500, 200, 400)]
    (tmp_path / "c" / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 1024, "height": 1024}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": k + 1, "bbox": list(b), "area": b[2] * b[3],
                         "iscrowd": 0, "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3]]]}
                        for k, b in enumerate(boxes)],
        "categories": [{"id": k, "name": f"c{k}"} for k in range(1, 81)]}))
    train = CocoDetection(tmp_path / "c", "train")
    model, cfg = vit_detector(RECIPES / "maskrcnn_vit-b16_coco-1x.yaml", batch_size=1, num_workers=0, log_every=1)
    assert sum(p.numel() for p in model.backbone.body.encoder.parameters()) == 85_798_656
    train_detector(model, train, train, cfg, tmp_path / "run", stop_after=1, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    assert rows[0]["lr"] == pytest.approx(3e-4 * 0.001)                  # the warm-up's first step
    assert (tmp_path / "run" / "last.pt").is_file()


def test_eval_report_adds_the_ap_columns(fmnist_small, canvases, tmp_path):
    run = tmp_path / "mae"
    assert main(["pretrain", "--config", MAE_TINY, "--out", str(run), "--data", f"idx:{fmnist_small}", "--steps", "2",
                 "data.batch_size=16", "data.num_workers=0", "train.sample_every=0"]) == 0
    assert main(["eval", "report", str(run), "--protocols", "detect", "--data", f"idx:{fmnist_small}",
                 "--detect-data", f"coco:{canvases}", "--detect-steps", "2", "--out", str(tmp_path / "report")]) == 0
    row = json.loads((tmp_path / "report/report.json").read_text())[0]
    table = (tmp_path / "report/report.md").read_text()
    assert "| run | AP box | AP50 box | AP mask | AP50 mask |" in table
    assert f"| {row['detect']['box_ap']:.2f} |" in table and (tmp_path / "report" / row["detect_png"]).is_file()
    assert main(["eval", "report", str(run), "--protocols", "detect", "--data", f"idx:{fmnist_small}"]) == 2


def test_the_train_transform_moves_boxes_with_their_masks_through_flip_and_jitter():
    from mimkit.eval.detect import DetectTrainTransform
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:38, 2:8] = 1
    target = {"boxes": torch.tensor([[10.0, 5, 30, 15], [2, 20, 8, 38]]), "labels": torch.tensor([1, 2]),
              "masks": masks, "image_id": 1}

    def extents(m):
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
    flipped = 0
    for seed in range(8):                                   # CPU recipe: flip only, the image keeps its size
        image, out = DetectTrainTransform(load_detect_recipe(CPU_RECIPE))(torch.zeros(1, 40, 50, dtype=torch.uint8),
                                                                           target, seed)
        assert image.shape == (1, 40, 50) and [extents(m) for m in out["masks"]] == out["boxes"].tolist()
        flipped += out["boxes"][0].tolist() == [20.0, 5, 40, 15]          # x -> 50 - x
    assert 0 < flipped < 8
    jitter = load_detect_recipe(RECIPES / "maskrcnn_vit-b16_coco-768.yaml", ["max_size=64"])
    for seed in range(8):                                   # VE's large-scale jitter: 64 square, boxes re-measured
        image, out = DetectTrainTransform(jitter)(torch.zeros(1, 40, 50, dtype=torch.uint8), target, seed)
        assert image.shape == (1, 64, 64) and out["masks"].shape[1:] == (64, 64)
        assert [extents(m) for m in out["masks"]] == out["boxes"].tolist() and len(out["labels"]) == len(out["masks"])
