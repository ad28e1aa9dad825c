"""Object detection and instance segmentation transfer (`mimkit eval detect`): the COCO protocol of VE Table 4b,
GAN-MAE Table 4, Perceptual MAE Table 3 and CAE Table 4, on any `coco:DIR` data.

The detector is torchvision's `MaskRCNN` (its RPN, RoI heads, losses and post-processing) over a torchvision
`FeaturePyramidNetwork` (256 channels, a max-pooled 5th level) fed by `eval.pyramid`:
- `pyramid: multiscale`: blocks 4/6/8/12 of a ViT-B resampled to strides 4/8/16/32 px, the adaptor of BEiT's and
  CAE's detection code (CAE's mask_rcnn_vit_fpn: out_indices 3/5/7/11) - one implementation with `eval segment`.
- `pyramid: simple`: ViTDet's simple feature pyramid, every scale from the last block. It differs from ViTDet in
  BatchNorm (not LayerNorm) in the x4 branch and in torchvision's FPN after it (ViTDet has no top-down path).
- A ResNet encoder gives its four stages.
VE's MIMDet baseline (Li et al. 2021's benchmarking ViT Mask R-CNN) is closest to `multiscale` with the 4conv1fc box
head; it differs in windowed attention in most blocks (timm's ViT attends globally) and SyncBN in the FPN.

Recipes (configs/detect/): CAE's 1x (Appendix: multi-scale training, short side 480-800, long side <= 1333, batch 32,
lr 3e-4; the rest of its appendix text is garbled, so layer decay 0.75, drop path 0.2, lr drops at epochs 9 and 11,
500 warm-up iterations and the 4conv1fc box head with BatchNorm are taken from CAE's official config
vit_base_giou_4conv1f_coco_maskrcnn_1x), VE's 768 px variant (Table 4b "768^2", MIMDet's benchmarking recipe: large-
scale jitter 0.1-2.0, cosine decay, AdamW lr 1.6e-4, weight decay 0.2, 25 epochs, no layer decay) and a CPU recipe.

Differences from the papers' code, each stated: torchvision's box regression loss is smooth-L1 (CAE's config uses
GIoU with weight 10, MIMDet's L1), its RoIAlign is not the aligned (half-pixel) variant, the box head's BatchNorm is
per process (not SyncBN); mmdet's AutoAugment crop branch of CAE's pipeline is not applied (multi-scale resize and flip
are). AP comes from pycocotools' COCOeval (boxes and masks, crowd regions ignored as COCO does).

Every sample's flip (and jitter) is seeded by (seed, epoch, index); torchvision's multi-scale draw and the RoI
samplers use the global RNG, whose state is checkpointed, so `--resume` reproduces the uninterrupted run's losses.
"""
from __future__ import annotations

import contextlib
import io
import math
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import masks_to_boxes
from tqdm import tqdm

from mimkit.data import to_unit_float
from mimkit.engine.logging import MetricsLog
from mimkit.eval.dense import (Seeded, dense_encoder, head_groups, layer_decay_groups, require, resume_run,
                               save_run, save_titled, seeded_batches)
from mimkit.eval.pyramid import ResNetPyramid, ViTPyramid, default_blocks, is_vit, simple_blocks

RECIPES = Path(__file__).resolve().parents[3] / "configs" / "detect"
CPU_RECIPE = RECIPES / "maskrcnn_vit-mini_fmnist-canvas.yaml"    # eval report's and the benchmarks' default
PYRAMIDS = ("multiscale", "simple")
BOX_HEADS = ("2fc", "4conv1fc")
SCHEDULES = ("step", "cosine")
AP_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")   # COCOeval.stats[0:6]


@dataclass
class DetectConfig:
    """A detection protocol (a recipe in configs/detect/)."""
    pyramid: str = "multiscale"            # multiscale (BEiT/CAE's adaptor) | simple (ViTDet's, from the last block)
    blocks: list | None = None             # multiscale over a ViT: 4 blocks, 1-based (None: 4/6/8/12 of 12, scaled)
    fpn_channels: int = 256
    box_head: str = "4conv1fc"             # 4conv1fc (CAE's ViT-B config, BatchNorm) | 2fc (mmdet's/torchvision's)
    train_sizes: list = field(default_factory=lambda: list(range(480, 801, 32)))   # short sides, one drawn per image
    test_size: int = 800                   # short side at test time
    max_size: int = 1333                   # long side at most
    jitter: list | None = None             # [low, high]: large-scale jitter instead (resize by a factor of
                                           # max_size, crop or pad to max_size square; MIMDet's/VE's)
    anchor_sizes: list = field(default_factory=lambda: [32, 64, 128, 256, 512])   # px, one per level (P2-P6)
    aspect_ratios: list = field(default_factory=lambda: [0.5, 1.0, 2.0])
    box_fc_channels: int = 1024            # the box head's fully connected width (mmdet's and torchvision's: 1024)
    mask_head_channels: int = 256          # the mask head's 4 convolutions (mmdet's and torchvision's: 256)
    rois_per_image: int = 512              # RoIs sampled per image for the box and mask losses (25 % positive)
    roi_sampling_ratio: int = 0            # RoIAlign samples per bin (0: adaptive, mmdet's; torchvision's default 2)
    detections_per_image: int = 100
    score_threshold: float = 0.05
    epochs: int = 12                       # 1x
    steps: int | None = None               # iterations instead of epochs; the lr drops keep their share of the run
    schedule: str = "step"                 # step (x drop_factor at lr_drops) | cosine (to 0)
    lr_drops: list = field(default_factory=lambda: [9, 11])   # epochs of `epochs`
    drop_factor: float = 0.1
    batch_size: int = 32
    lr: float = 3e-4                       # at batch_size, not rescaled
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05
    layer_decay: float = 0.75              # per block from the top down (1: none)
    drop_path: float = 0.2
    warmup_steps: int = 500
    warmup_ratio: float = 0.001            # the lr warm-up starts at this share (mmdet's linear warm-up)
    hflip: bool = True
    eval_every: int | None = None          # iterations between validations (None: at the end)
    ckpt_every: int = 1000
    log_every: int = 50
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self):
        need = partial(require, "detect recipe", self)
        need(self.pyramid in PYRAMIDS, "pyramid", f"one of {', '.join(PYRAMIDS)}")
        need(self.box_head in BOX_HEADS, "box_head", f"one of {', '.join(BOX_HEADS)}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
        need(self.blocks is None or len(self.blocks) == 4, "blocks", "4 block numbers or null")
        need(len(self.train_sizes) >= 1 and min(self.train_sizes) >= 1, "train_sizes", "a list of positive sizes")
        need(len(self.anchor_sizes) == 5 and min(self.anchor_sizes) > 0, "anchor_sizes",
             "5 positive sizes in pixels, one per pyramid level (P2-P6)")
        need(len(self.aspect_ratios) >= 1 and min(self.aspect_ratios) > 0, "aspect_ratios", "positive ratios")
        need(self.jitter is None or (len(self.jitter) == 2 and 0 < self.jitter[0] <= self.jitter[1]), "jitter",
             "[low, high] with 0 < low <= high, or null")
        need(self.steps is None or self.steps >= 1, "steps", "at least 1 or null")
        need(all(0 < e <= self.epochs for e in self.lr_drops), "lr_drops", f"epochs within 1..{self.epochs}")
        for key in ("epochs", "batch_size", "fpn_channels", "box_fc_channels", "mask_head_channels", "rois_per_image",
                    "test_size", "max_size", "detections_per_image", "ckpt_every", "log_every"):
            need(getattr(self, key) >= 1, key, "at least 1")
        for key in ("warmup_steps", "num_workers", "seed", "roi_sampling_ratio"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.eval_every is None or self.eval_every >= 1, "eval_every", "at least 1 or null")
        need(self.lr > 0, "lr", "positive")
        need(self.weight_decay >= 0 and self.drop_path >= 0, "weight_decay", "0 or more (drop_path too)")
        need(0 < self.layer_decay <= 1, "layer_decay", "in (0, 1]")
        need(0 < self.warmup_ratio <= 1, "warmup_ratio", "in (0, 1]")
        need(0 < self.drop_factor <= 1, "drop_factor", "in (0, 1]")
        need(0 <= self.score_threshold < 1, "score_threshold", "in [0, 1)")


def load_detect_recipe(path, overrides=()) -> DetectConfig:
    from mimkit.config import build_dataclass, load_yaml, merge, parse_overrides
    return build_dataclass(DetectConfig, merge(load_yaml(path) if path else {}, parse_overrides(list(overrides))))


# ---------------------------------------------------------------------------------------------------- the model
class PyramidFPN(nn.Module):
    """The encoder's pyramid -> torchvision's FPN with a max-pooled 5th level: the `backbone` MaskRCNN takes. An
    encoder built for one input size (a Beit's relative position tables) gets its input padded to it."""

    def __init__(self, pyramid: nn.Module, channels: int, fixed_size: tuple[int, int] | None = None):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        self.body, self.fixed_size, self.out_channels = pyramid, fixed_size, channels
        self.fpn = FeaturePyramidNetwork(list(pyramid.channels), channels, extra_blocks=LastLevelMaxPool())

    def forward(self, x: torch.Tensor) -> OrderedDict:
        h, w = x.shape[-2:]
        if self.fixed_size:
            if h > self.fixed_size[0] or w > self.fixed_size[1]:
                raise ValueError(f"an input of {h}x{w} exceeds the {self.fixed_size[0]}x{self.fixed_size[1]} the "
                                 f"encoder was built for; lower max_size")
            x = F.pad(x, (0, self.fixed_size[1] - w, 0, self.fixed_size[0] - h))
        maps = self.body(x)
        if self.fixed_size:
            maps = [m[..., :math.ceil(h / s), :math.ceil(w / s)] for m, s in zip(maps, self.body.strides)]
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def detection_encoder(timm_spec: tuple[str, dict], state: dict, cfg: DetectConfig):
    """(encoder, the one input size it takes or None): a Beit (relative position tables) is built for the largest
    input the resize gives, max_size square rounded up to 32 px, and gets every input padded to it."""
    name, kwargs = timm_spec
    fixed = (-(-cfg.max_size // 32) * 32,) * 2 if name.startswith("beit") else None
    return dense_encoder(name, kwargs, state, cfg.drop_path, img_size=fixed), fixed


def build_detector(encoder: nn.Module, fixed_size: tuple[int, int] | None, num_classes: int, mean, std,
                   cfg: DetectConfig) -> nn.Module:
    """torchvision's MaskRCNN (`num_classes` + background) over the encoder's pyramid and an FPN."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign
    if is_vit(encoder):
        depth = len(encoder.blocks)
        pyramid = ViTPyramid(encoder, cfg.blocks or (simple_blocks(depth) if cfg.pyramid == "simple" else
                                                     default_blocks(depth)))
    elif cfg.pyramid == "simple":
        raise ValueError("pyramid: simple resamples a ViT's last block; a ResNet gives its stages (pyramid: multiscale)")
    else:
        pyramid = ResNetPyramid(encoder)
    c, m, fc = cfg.fpn_channels, cfg.mask_head_channels, cfg.box_fc_channels
    levels = ["0", "1", "2", "3"]
    box_head = TwoMLPHead(c * 7 * 7, fc) if cfg.box_head == "2fc" else \
        FastRCNNConvFCHead((c, 7, 7), [c] * 4, [fc], norm_layer=nn.BatchNorm2d)
    model = MaskRCNN(
        PyramidFPN(pyramid, c, fixed_size), None,
        min_size=tuple(cfg.train_sizes), max_size=cfg.max_size, image_mean=list(mean), image_std=list(std),
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * 5),
        box_roi_pool=MultiScaleRoIAlign(levels, 7, cfg.roi_sampling_ratio), box_head=box_head,
        box_predictor=FastRCNNPredictor(fc, num_classes + 1), box_batch_size_per_image=cfg.rois_per_image,
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, cfg.roi_sampling_ratio),
        mask_head=MaskRCNNHeads(c, [m] * 4, 1), mask_predictor=MaskRCNNPredictor(m, m, num_classes + 1),
        box_detections_per_img=cfg.detections_per_image, box_score_thresh=cfg.score_threshold,
        size_divisible=pyramid.size_multiple)
    # the short sides torchvision resizes to; jittered images arrive max_size square and are resized by none
    model.train_sizes = (cfg.max_size,) if cfg.jitter else tuple(cfg.train_sizes)
    model.test_sizes = (cfg.max_size,) if cfg.jitter else (cfg.test_size,)
    return set_mode(model, True)


def set_mode(model: nn.Module, training: bool) -> nn.Module:
    """train()/eval(), with the short side torchvision resizes to: drawn from train_sizes, or the test size."""
    model.train(training)
    model.transform.min_size = model.train_sizes if training else model.test_sizes
    return model


def encoder_of(model: nn.Module) -> nn.Module:
    return model.backbone.body.encoder


def param_groups(model: nn.Module, cfg: DetectConfig) -> list[dict]:
    """The encoder's layer-decay groups (`dense.layer_decay_groups`), the pyramid, FPN and heads at scale 1."""
    mine = {id(p) for p in encoder_of(model).parameters()}
    head = [p for p in model.parameters() if id(p) not in mine]
    return layer_decay_groups(encoder_of(model), cfg.weight_decay, cfg.layer_decay) + head_groups(head, cfg.weight_decay)


def count_parameters(model: nn.Module) -> dict:
    encoder = sum(p.numel() for p in encoder_of(model).parameters())
    return {"encoder": encoder, "detector": sum(p.numel() for p in model.parameters()) - encoder}


# ---------------------------------------------------------------------------------------------------- schedule
def total_steps(cfg: DetectConfig, train_count: int) -> int:
    return cfg.steps or cfg.epochs * max(train_count // cfg.batch_size, 1)


def learning_rate(step: int, total: int, cfg: DetectConfig) -> float:
    """Linear warm-up from warmup_ratio of the lr (mmdet's), then drops by drop_factor at lr_drops (epochs, as shares
    of the run, so a short --steps run drops too) or cosine decay to 0."""
    if cfg.schedule == "cosine":
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    else:
        lr = cfg.lr * cfg.drop_factor ** sum(step >= round(total * e / cfg.epochs) for e in cfg.lr_drops)
    if step < cfg.warmup_steps:
        lr *= 1 - (1 - cfg.warmup_ratio) * (1 - step / cfg.warmup_steps)
    return lr


# ---------------------------------------------------------------------------------------------------- data
class DetectTrainTransform:
    """Seeded per sample: large-scale jitter (`jitter`: resize by a factor of max_size, crop or pad to max_size
    square, boxes recomputed from the cropped masks) and a horizontal flip. The multi-scale resize of the 1x recipe
    is torchvision's, inside the model."""

    def __init__(self, cfg: DetectConfig):
        self.cfg = cfg

    def __call__(self, image: torch.Tensor, target: dict, seed: int):
        gen = torch.Generator().manual_seed(seed)
        image, target = to_unit_float(image), dict(target)
        if self.cfg.jitter:
            image, target = self.jitter(image, target, gen)
        if self.cfg.hflip and torch.rand((), generator=gen).item() < 0.5:
            width = image.shape[-1]
            image, target["masks"] = image.flip(-1), target["masks"].flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
            target["boxes"] = boxes
        return image, target

    def jitter(self, image: torch.Tensor, target: dict, gen: torch.Generator):
        size = self.cfg.max_size
        low, high = self.cfg.jitter
        factor = low + (high - low) * torch.rand((), generator=gen).item()
        h, w = image.shape[-2:]
        scale = factor * size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        masks = F.interpolate(target["masks"][None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
        top = int(torch.randint(max(nh - size, 0) + 1, (), generator=gen))
        left = int(torch.randint(max(nw - size, 0) + 1, (), generator=gen))
        image, masks = image[:, top:top + size, left:left + size], masks[:, top:top + size, left:left + size]
        ph, pw = size - image.shape[1], size - image.shape[2]
        image, masks = F.pad(image, (0, pw, 0, ph)), F.pad(masks, (0, pw, 0, ph))
        keep = masks.flatten(1).any(1)
        masks = masks[keep]
        boxes = masks_to_boxes(masks)
        boxes[:, 2:] += 1                   # pixel edges: a one-pixel mask is 1 x 1, as the dataset's boxes
        return image, {**target, "masks": masks, "boxes": boxes, "labels": target["labels"][keep]}


def collate_lists(batch):
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------------------------- metrics
def coco_scores(coco_gt, detections: list[dict]) -> dict:
    """COCO AP through pycocotools' COCOeval, boxes and masks: {"box": {ap, ap50, ...}, "mask": {...}} in percent
    (None where the ground truth has no object of that size). `detections`: COCO results (image_id, category_id,
    score, bbox [x, y, w, h], segmentation RLE)."""
    from pycocotools.cocoeval import COCOeval
    scores = {}
    for kind, iou_type, drop in (("box", "bbox", "segmentation"), ("mask", "segm", "bbox")):
        if not detections:
            scores[kind] = {k: 0.0 for k in AP_KEYS}
            continue
        # one kind of result per evaluation: loadRes takes the area from a box when both are given
        results = [{k: v for k, v in d.items() if k != drop} for d in detections]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        scores[kind] = {k: (round(100 * float(v), 2) if v >= 0 else None) for k, v in zip(AP_KEYS, evaluation.stats)}
    return scores


def coco_results(output: dict, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's MaskRCNN output (boxes x1y1x2y2, labels 1..K, scores, masks [N, 1, H, W] probabilities) as COCO
    results; masks thresholded at 0.5 as torchvision's and mmdet's do."""
    from mimkit.data.detection import encode_mask
    boxes = output["boxes"].float().cpu()
    masks = (output["masks"][:, 0] > 0.5).cpu().numpy() if "masks" in output else None
    results = []
    for k, (box, label, score) in enumerate(zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist())):
        result = {"image_id": image_id, "category_id": category_ids[label - 1], "score": float(score),
                  "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
        if masks is not None:
            result["segmentation"] = encode_mask(masks[k].astype(np.uint8))
        results.append(result)
    return results


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device, limit: int | None = None, batch_size: int = 4) -> dict:
    """COCO AP of the model on (the first `limit` images of) a split."""
    was = model.training
    set_mode(model, False)
    count = min(len(dataset), limit or len(dataset))
    detections = []
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        images = [to_unit_float(dataset.image(i)).to(device) for i in indices]
        for i, output in zip(indices, model(images)):
            detections += coco_results(output, dataset.image_ids[i], dataset.category_ids)
    gt = dataset.coco
    if limit and count < len(dataset):
        from mimkit.data.detection import quiet_coco
        kept = set(dataset.image_ids[:count])
        gt = quiet_coco(dataset=dict(gt.dataset, images=[im for im in gt.dataset["images"] if im["id"] in kept],
                                     annotations=[a for a in gt.dataset["annotations"] if a["image_id"] in kept]))
    set_mode(model, was)
    return coco_scores(gt, detections)


# ---------------------------------------------------------------------------------------------------- training
def train_detector(model: nn.Module, train_set, val_set, cfg: DetectConfig, out: str | Path, resume: bool = False,
                   device="cpu", stop_after: int | None = None, quiet: bool = False,
                   val_limit: int | None = None) -> dict:
    """Fine-tunes `model` for the recipe's iterations (or stops after step `stop_after`, checkpointed and not
    evaluated, as a crash would); returns the final validation AP and the run's facts."""
    out, device = Path(out), torch.device(device)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{len(train_set)} annotated training images cannot fill one batch of {cfg.batch_size}; use "
                         f"more images or a smaller batch (--set batch_size={max(1, len(train_set))})")
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas))
    torch.manual_seed(cfg.seed)
    start_step = resume_run(out, "mimkit-detect", asdict(cfg), model, opt, resume)
    log = MetricsLog(out, start_step if start_step else None)
    total = total_steps(cfg, len(train_set))
    data = Seeded(train_set, DetectTrainTransform(cfg))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    set_mode(model, True)
    end = min(total, stop_after or total)
    bar = tqdm(total=total, initial=start_step, disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True,
               desc="detect")
    running, steps_in_row, tick, seen, scores = {}, 0, time.perf_counter(), 0, None
    stream = seeded_batches(data, cfg.batch_size, cfg.seed, start_step, cfg.num_workers, device.type == "cuda",
                            collate_lists)
    for step in range(start_step, end):
        images, targets = next(stream)
        now = learning_rate(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = now * group["lr_scale"]
        images = [x.to(device, non_blocking=True) for x in images]
        targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        with autocast:
            losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for key, value in (("loss", loss), *losses.items()):
            running[key] = running.get(key, 0) + value.detach().float()
        steps_in_row, seen = steps_in_row + 1, seen + len(images)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            elapsed = time.perf_counter() - tick
            means = (torch.stack(list(running.values())) / steps_in_row).tolist()     # one sync for all terms
            row = {"step": done, **dict(zip(running, means)), "lr": now, "img_per_s": seen / max(elapsed, 1e-9)}
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")
            log.write(row)
            running, steps_in_row, tick, seen = {}, 0, time.perf_counter(), 0
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == total:
            scores = evaluate(model, val_set, device, val_limit)          # back in training mode after it
            log.write({"step": done, **{f"val/box_{k}": v for k, v in scores["box"].items() if v is not None},
                       **{f"val/mask_{k}": v for k, v in scores["mask"].items() if v is not None}})
        if done % cfg.ckpt_every == 0 or done == end:
            save_run(out, "mimkit-detect", asdict(cfg), done, model, opt)
    bar.close()
    if scores is None and end == total:
        scores = evaluate(model, val_set, device, val_limit)
    return {**(scores or {}), "steps": end}


def draw_detections(model: nn.Module, dataset, path: str | Path, title: str, count: int = 6,
                    min_score: float = 0.5) -> Path:
    """Ground truth (top) and predictions with score >= min_score (bottom) on the first `count` validation images:
    masks tinted per instance, boxes with class names (and scores) (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device = next(model.parameters()).device
    set_mode(model, False)
    count = min(count, len(dataset))
    fig, axes = plt.subplots(2, count, figsize=(2.4 * count, 5.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for i in range(count):
        image = to_unit_float(dataset.image(i))
        with torch.no_grad():
            output = model([image.to(device)])[0]
        keep = output["scores"] >= min_score
        predicted = {"boxes": output["boxes"][keep].cpu(), "labels": output["labels"][keep].cpu(),
                     "masks": (output["masks"][keep, 0] > 0.5).cpu(), "scores": output["scores"][keep].cpu()}
        for row, target in ((0, dataset.target(i)), (1, predicted)):
            ax = axes[row, i]
            shown = image[0] if image.shape[0] == 1 else image[:3].permute(1, 2, 0)
            ax.imshow(shown.numpy(), cmap="gray", vmin=0, vmax=1)
            for k, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist())):
                colour = colours(k % 10)
                tint = np.zeros((*target["masks"].shape[-2:], 4))
                tint[target["masks"][k].numpy().astype(bool)] = (*colour[:3], 0.45)
                ax.imshow(tint)
                ax.add_patch(plt.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                           edgecolor=colour, linewidth=1.2))
                text = dataset.classes[label - 1] + (f" {target['scores'][k]:.2f}" if "scores" in target else "")
                ax.text(box[0], box[1] - 1, text, color=colour, fontsize=6, va="bottom")
    axes[0, 0].set_ylabel("ground truth")
    axes[1, 0].set_ylabel(f"predicted (score >= {min_score})")
    return save_titled(fig, path, title)


def detect_transfer(timm_spec: tuple[str, dict], state: dict, description: str, data: str, cfg: DetectConfig,
                    out: str | Path, mean: list | None = None, std: list | None = None, device="cpu",
                    resume: bool = False, val_limit: int | None = None, quiet: bool = False, log=print,
                    train_set=None) -> dict:
    """The whole protocol for one encoder (timm name + kwargs, weights): coco:DIR's splits, the detector, training,
    COCO AP and the picture; `mean`/`std` None: the data's own. The result `eval detect` prints."""
    from mimkit.data.detection import detection_split
    start = time.time()
    train_set = detection_split(data, "train") if train_set is None else train_set   # opened once by a caller
    val_set = detection_split(data, "val")
    if train_set.classes != val_set.classes:
        raise ValueError(f"{data}: the train and val annotation files list different categories; use one category list")
    name, kwargs = timm_spec
    if kwargs.get("in_chans", 3) != train_set.channels:
        raise ValueError(f"the encoder takes {kwargs.get('in_chans', 3)}-channel images but {data} holds "
                         f"{train_set.channels}-channel ones; detect on data of the encoder's channel count")
    mean, std = (mean, std) if mean is not None else (train_set.mean, train_set.std)
    model = build_detector(*detection_encoder(timm_spec, state, cfg), train_set.num_classes, mean, std, cfg)
    params = count_parameters(model)
    total = total_steps(cfg, len(train_set))
    log(f"eval detect: Mask R-CNN ({cfg.pyramid} pyramid, {cfg.box_head} box head; {params['detector']:,} parameters) "
        f"on {description} ({params['encoder']:,} parameters); {len(train_set)} train / {len(val_set)} val images, "
        f"{train_set.num_classes} classes, {total} iterations")
    result = train_detector(model, train_set, val_set, cfg, out, resume, device, quiet=quiet, val_limit=val_limit)
    picture = draw_detections(model, val_set, Path(out) / "detect-examples.png",
                              f"eval detect: Mask R-CNN on {description} - val AP box {result['box']['ap']:.1f}, "
                              f"mask {result['mask']['ap']:.1f}")
    return {"protocol": "detect", **{f"box_{k}": v for k, v in result["box"].items()},
            **{f"mask_{k}": v for k, v in result["mask"].items()}, "encoder": description, "pyramid": cfg.pyramid,
            "steps": result["steps"], "n_train": len(train_set), "n_val": min(len(val_set), val_limit or len(val_set)),
            "params_encoder": params["encoder"], "params_detector": params["detector"], "out": str(out),
            "picture": str(picture), "wall_s": round(time.time() - start, 1)}
