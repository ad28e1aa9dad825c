"""Semantic segmentation transfer (`mimkit eval segment`): the ADE20K protocol the five papers report, on any
`seg:DIR` data.

Heads, one per paper's protocol (`head:` in the recipe):
- `upernet`: UperNet (PPM + FPN, Xiao et al. 2018) over `eval.pyramid`'s multi-scale adaptor, with an auxiliary FCN
  head on the stride-16 map (weight 0.4), as BEiT's, MAE's (mae_segmentation) and CAE's mmsegmentation configs; VE
  Table 4a, CAE Table 3, Perceptual MAE Sec. 4. The decoder is segmentation_models_pytorch's `UPerNetDecoder`
  (its UPerNet model refuses a plain ViT, its decoder takes the adaptor's maps). It differs from mmsegmentation's
  UPerHead in a LayerNorm on each input map; its width is `decoder_channels` (BEiT: 768).
- `linear`: CIM's ViT protocol (Sec. 3.2, "a simple linear layer as the decoder"): BatchNorm + a 1x1 convolution on
  the last block's patch map, upsampled bilinearly. With `frozen: true` (`--frozen`) it is the cheap probe: only
  the head trains.
- `fcn`: CIM's ResNet-50 protocol (Sec. 3.2, FCN, Long et al. 2015): torchvision's `FCNHead` on the last stage and an
  auxiliary one on the third (weight 0.4, mmsegmentation's fcn_r50-d8). torchvision's head is one 3x3 convolution to
  in/4 channels (512 at ResNet-50); mmsegmentation's has two 3x3 convolutions of 512 and concatenates the input.

Training follows mmsegmentation's ADE20K pipeline as the papers' code bases use it: random rescale (ratio 0.5-2.0 of a
short side `resize_short`), random crop `crop_size` (padded with the ignore index), horizontal flip; AdamW (or SGD
for the ResNet recipe) with layer-wise lr decay over the encoder as BEiT/MAE count it (`param_groups`; the head at
scale 1), linear warm-up then poly decay; cross-entropy that skips the ignore index. Differences, each an option or stated: mmsegmentation's
photometric distortion and its crop's `cat_max_ratio` retry are not applied. Inference is single-scale: sliding
crop-sized windows (`inference: slide`, BEiT's and MAE's test mode, the ADE20K recipes) or the whole image padded to
the network's stride (`whole`, the CPU recipe).

Every sample's crop is seeded by (seed, epoch, index) and the RNG state is checkpointed, so `--resume` reproduces the
uninterrupted run's losses.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mimkit.data import to_unit_float
from mimkit.engine.logging import MetricsLog
from mimkit.eval.dense import (Seeded, dense_encoder, head_groups, layer_decay_groups, require, resume_run,
                               save_run, save_titled, seeded_batches)
from mimkit.eval.pyramid import build_pyramid, is_vit

RECIPES = Path(__file__).resolve().parents[3] / "configs" / "segment"
CPU_RECIPE = RECIPES / "upernet_vit-mini_fmnist-canvas.yaml"    # eval report's and the benchmarks' default
HEADS = ("upernet", "linear", "fcn")


@dataclass
class SegmentConfig:
    """A segmentation protocol (a recipe in configs/segment/)."""
    head: str = "upernet"                  # upernet | linear | fcn
    frozen: bool = False                   # true: the encoder is not trained (the linear probe)
    blocks: list | None = None             # upernet over a ViT: 4 blocks, 1-based (None: 4/6/8/12 of 12, scaled)
    decoder_channels: int = 768            # UperNet's width (BEiT's ViT-B config: 768)
    decoder_norm: str = "batchnorm"        # UperNet's convolutions: batchnorm (mmsegmentation's) | identity (none; for
                                           # batch 1, where the pyramid pooling's 1x1 map leaves BatchNorm one value)
    aux_weight: float = 0.4                # the auxiliary FCN head's loss weight (0: none)
    output_stride: int | None = None       # ResNet: dilate to this stride (FCN's d8: 8); None: the encoder's
    steps: int = 160000                    # iterations
    batch_size: int = 16
    optimizer: str = "adamw"               # adamw | sgd (momentum 0.9)
    lr: float = 1e-4                       # at batch_size, not rescaled
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    weight_decay: float = 0.05
    layer_decay: float = 0.65              # per block from the head down (1: none)
    drop_path: float = 0.1
    warmup_steps: int = 1500
    power: float = 1.0                     # poly decay exponent after warm-up
    min_lr: float = 0.0
    crop_size: list = field(default_factory=lambda: [512, 512])
    resize_short: int | None = 512         # the short side the rescale ratio multiplies (train) and test images get
    scale_range: list = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    inference: str = "whole"               # whole (the image, padded to the network's stride) | slide (crop_size
    slide_stride: list = field(default_factory=lambda: [341, 341])   # windows at this stride, logits averaged: BEiT's)
    eval_every: int = 16000
    ckpt_every: int = 2000
    log_every: int = 50
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self):
        need = partial(require, "segment recipe", self)
        need(self.head in HEADS, "head", f"one of {', '.join(HEADS)}")
        need(self.optimizer in ("adamw", "sgd"), "optimizer", "adamw or sgd")
        need(self.decoder_norm in ("batchnorm", "identity"), "decoder_norm", "batchnorm or identity")
        need(self.inference in ("whole", "slide"), "inference", "whole or slide")
        need(len(self.slide_stride) == 2 and min(self.slide_stride) >= 1, "slide_stride", "[rows, columns] of positive steps")
        if self.head == "upernet" and self.batch_size == 1 and self.decoder_norm == "batchnorm" and not self.frozen:
            raise ValueError("segment recipe: batch_size=1 leaves UperNet's BatchNorm one value per channel in the "
                             "pyramid pooling; use 2 or more images per step or --set decoder_norm=identity")
        for key in ("steps", "batch_size", "decoder_channels", "eval_every", "ckpt_every", "log_every"):
            need(getattr(self, key) >= 1, key, "at least 1")
        for key in ("warmup_steps", "num_workers", "seed"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.lr > 0, "lr", "positive")
        for key in ("weight_decay", "aux_weight", "min_lr", "drop_path", "power"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(0 < self.layer_decay <= 1, "layer_decay", "in (0, 1]")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(len(self.crop_size) == 2 and min(self.crop_size) >= 1, "crop_size", "[height, width] of positive sizes")
        need(len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1], "scale_range",
             "[low, high] with 0 < low <= high")
        need(self.resize_short is None or self.resize_short >= 1, "resize_short", "positive or null")
        need(self.output_stride in (None, 8, 16, 32), "output_stride", "8, 16, 32 or null")
        need(self.blocks is None or len(self.blocks) == 4, "blocks", "4 block numbers or null")


def load_segment_recipe(path, overrides=()) -> SegmentConfig:
    from mimkit.config import build_dataclass, load_yaml, merge, parse_overrides
    return build_dataclass(SegmentConfig, merge(load_yaml(path) if path else {}, parse_overrides(list(overrides))))


# ---------------------------------------------------------------------------------------------------- the model
class LastMaps(nn.Module):
    """The encoder's last two stages at their own stride (a ViT: blocks 2/3 and 3/3 of its depth at the patch
    stride; a ResNet: stages 3 and 4), for the linear and FCN heads (the first feeds the auxiliary head)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        if is_vit(encoder):
            depth, patch = len(encoder.blocks), encoder.patch_embed.patch_size[0]
            self.indices, self.channels = [round(depth * 2 / 3) - 1, depth - 1], [encoder.embed_dim] * 2
            self.size_multiple = patch
        else:
            self.indices, self.channels = [3, 4], [f["num_chs"] for f in encoder.feature_info[-2:]]
            self.size_multiple = 32

    def forward(self, x):
        if is_vit(self.encoder):
            return self.encoder.forward_intermediates(x, indices=self.indices, norm=False, output_fmt="NCHW",
                                                      intermediates_only=True)
        return self.encoder.forward_intermediates(x, indices=self.indices, intermediates_only=True)


class Segmenter(nn.Module):
    """Encoder -> maps -> head; `forward` gives logits at the input's size (and the auxiliary head's in training)."""

    def __init__(self, encoder: nn.Module, num_classes: int, cfg: SegmentConfig):
        super().__init__()
        from torchvision.models.segmentation.fcn import FCNHead
        self.encoder, self.frozen, self.head_kind = encoder, cfg.frozen, cfg.head
        if cfg.head == "upernet":
            from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
            self.maps = build_pyramid(encoder, cfg.blocks)
            self.decoder = UPerNetDecoder([0, 0] + self.maps.channels, encoder_depth=5,
                                          decoder_channels=cfg.decoder_channels, use_norm=cfg.decoder_norm)
            self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(cfg.decoder_channels, num_classes, 1))
            aux_channels = self.maps.channels[2]
        else:
            self.maps = LastMaps(encoder)
            self.decoder = None
            last = self.maps.channels[-1]
            self.classifier = FCNHead(last, num_classes) if cfg.head == "fcn" else \
                nn.Sequential(nn.BatchNorm2d(last), nn.Conv2d(last, num_classes, 1))
            aux_channels = self.maps.channels[0]
        self.aux = FCNHead(aux_channels, num_classes) if cfg.aux_weight > 0 and cfg.head != "linear" else None
        self.size_multiple = self.maps.size_multiple
        if cfg.frozen:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()     # a frozen encoder keeps its BatchNorm statistics and drops no path
        return self

    def head_parameters(self):
        mine = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in mine]

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.maps(x)
        if self.decoder is not None:
            logits = self.classifier(self.decoder([None, None] + list(maps)))
            aux_in = maps[2]
        else:
            logits, aux_in = self.classifier(maps[-1]), maps[0]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux is not None:
            return logits, F.interpolate(self.aux(aux_in), size=size, mode="bilinear", align_corners=False)
        return logits


def count_parameters(model: Segmenter) -> dict:
    return {"encoder": sum(p.numel() for p in model.encoder.parameters()),
            "head": sum(p.numel() for p in model.head_parameters())}


# ---------------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """[num_classes, num_classes] counts, rows = target, columns = prediction; ignored pixels left out."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor, classes: list[str]) -> dict:
    """mIoU over the classes present in target or prediction (a class absent from both has no IoU and is left out
    of the mean, as mmsegmentation's nanmean), pixel accuracy, and each class's IoU (None where absent)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = ~iou.isnan()
    return {"miou": round(100 * iou[present].mean().item(), 2) if present.any() else 0.0,
            "pixel_acc": round(100 * (tp.sum() / confusion.sum().clamp(min=1)).item(), 2),
            "per_class_iou": {name: (round(100 * v, 2) if v == v else None) for name, v in zip(classes, iou.tolist())}}


# ---------------------------------------------------------------------------------------------------- data
class SegmentTrainTransform:
    """Random rescale, crop (padded with the ignore index) and flip of an (image, label) pair, seeded per sample."""

    def __init__(self, cfg: SegmentConfig, ignore_index: int):
        self.cfg, self.ignore = cfg, ignore_index

    def __call__(self, image: torch.Tensor, label: torch.Tensor, seed: int):
        cfg, gen = self.cfg, torch.Generator().manual_seed(seed)
        h, w = label.shape
        base = cfg.resize_short / min(h, w) if cfg.resize_short else 1.0
        low, high = cfg.scale_range
        ratio = base * (low + (high - low) * torch.rand((), generator=gen).item())
        size = (max(1, round(h * ratio)), max(1, round(w * ratio)))
        image, label = resize_pair(image, label, size)
        ch, cw = cfg.crop_size
        pad_h, pad_w = max(ch - size[0], 0), max(cw - size[1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore)
        top = int(torch.randint(image.shape[1] - ch + 1, (), generator=gen))
        left = int(torch.randint(image.shape[2] - cw + 1, (), generator=gen))
        image, label = image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]
        if cfg.hflip and torch.rand((), generator=gen).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()


def resize_pair(image: torch.Tensor, label: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear for the image (as float in [0, 1]), nearest for the label."""
    if tuple(size) == tuple(label.shape):
        return to_unit_float(image), label
    image = F.interpolate(to_unit_float(image)[None], size=size, mode="bilinear", align_corners=False,
                          antialias=True)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


# ---------------------------------------------------------------------------------------------------- training
def param_groups(model: Segmenter, cfg: SegmentConfig) -> list[dict]:
    """The encoder's layer-decay groups (`dense.layer_decay_groups`; none when frozen), the head at scale 1."""
    groups = [] if cfg.frozen else layer_decay_groups(model.encoder, cfg.weight_decay, cfg.layer_decay)
    return groups + head_groups(model.head_parameters(), cfg.weight_decay)


def learning_rate(step: int, cfg: SegmentConfig) -> float:
    """Linear warm-up from 1e-6 of the lr, then poly decay to min_lr (mmsegmentation's PolyLR with warm-up)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (1e-6 + (1 - 1e-6) * step / cfg.warmup_steps)
    done = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return (cfg.lr - cfg.min_lr) * (1 - done) ** cfg.power + cfg.min_lr


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple))


@torch.no_grad()
def predict(model: Segmenter, image: torch.Tensor, mean_t, std_t, cfg: SegmentConfig) -> torch.Tensor:
    """Class per pixel at the image's own size: resized to `resize_short`, then the whole image padded to the
    network's stride, or (`inference: slide`) crop-sized windows at `slide_stride` with their logits averaged, as
    BEiT's and MAE's mmsegmentation test mode; logits resized back."""
    h, w = image.shape[-2:]
    x = to_unit_float(image)[None]
    if cfg.resize_short:
        scale = cfg.resize_short / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False,
                          antialias=True)
    x = (x.to(mean_t.device) - mean_t) / std_t
    sh, sw = x.shape[-2:]
    if cfg.inference == "whole":
        logits = model(pad_to_multiple(x, model.size_multiple))[..., :sh, :sw].float()
    else:
        (ch, cw), (step_h, step_w) = cfg.crop_size, cfg.slide_stride
        x = F.pad(x, (0, max(cw - sw, 0), 0, max(ch - sh, 0)))
        ph, pw = x.shape[-2:]
        logits = count = 0
        for top in sorted({min(r * step_h, ph - ch) for r in range(-(-max(ph - ch, 0) // step_h) + 1)}):
            for left in sorted({min(c * step_w, pw - cw) for c in range(-(-max(pw - cw, 0) // step_w) + 1)}):
                window = torch.zeros(1, 1, ph, pw, device=x.device)
                window[..., top:top + ch, left:left + cw] = 1
                out = model(x[..., top:top + ch, left:left + cw]).float()
                logits = logits + F.pad(out, (left, pw - left - cw, top, ph - top - ch))
                count = count + window
        logits = (logits / count)[..., :sh, :sw]
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0].cpu()


def evaluate(model: Segmenter, dataset, mean_t, std_t, cfg: SegmentConfig, limit: int | None = None) -> dict:
    was = model.training
    model.eval()
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.long)
    for i in range(min(len(dataset), limit or len(dataset))):
        image, label = dataset[i]
        confusion += confusion_matrix(predict(model, image, mean_t, std_t, cfg), label,
                                      dataset.num_classes, dataset.ignore_index)
    model.train(was)
    return segmentation_scores(confusion, dataset.classes)


def train_segmenter(model: Segmenter, train_set, val_set, mean, std, cfg: SegmentConfig, out: str | Path,
                    resume: bool = False, device="cpu", stop_after: int | None = None, quiet: bool = False,
                    val_limit: int | None = None) -> dict:
    """Fine-tunes `model` for cfg.steps (or stops after step `stop_after`, checkpointed and not evaluated, as a crash
    would); returns the final validation scores and the run's facts."""
    out, device = Path(out), torch.device(device)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{len(train_set)} training images cannot fill one batch of {cfg.batch_size}; use more "
                         f"images or a smaller batch (--set batch_size={max(1, len(train_set))})")
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas)) if cfg.optimizer == "adamw" \
        else torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    torch.manual_seed(cfg.seed)
    start_step = resume_run(out, "mimkit-segment", asdict(cfg), model, opt, resume)
    log = MetricsLog(out, start_step if start_step else None)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    criterion = nn.CrossEntropyLoss(ignore_index=train_set.ignore_index)
    data = Seeded(train_set, SegmentTrainTransform(cfg, train_set.ignore_index))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    model.train()
    end = min(cfg.steps, stop_after or cfg.steps)
    bar = tqdm(total=cfg.steps, initial=start_step, disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True,
               desc="segment")
    running, steps_in_row, tick, seen, scores = torch.zeros((), device=device), 0, time.perf_counter(), 0, None
    stream = seeded_batches(data, cfg.batch_size, cfg.seed, start_step, cfg.num_workers, device.type == "cuda")
    for step in range(start_step, end):
        images, labels = next(stream)
        now = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = now * group["lr_scale"]
        x = (images.to(device, non_blocking=True) - mean_t) / std_t
        y = labels.to(device, non_blocking=True)
        with autocast:
            output = model(x)
            logits, aux = output if isinstance(output, tuple) else (output, None)
            loss = criterion(logits.float(), y)
            if aux is not None:
                loss = loss + cfg.aux_weight * criterion(aux.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.detach()
        steps_in_row, seen = steps_in_row + 1, seen + images.shape[0]
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            elapsed = time.perf_counter() - tick
            row = {"step": done, "loss": running.item() / steps_in_row, "lr": now, "img_per_s": seen / max(elapsed, 1e-9)}
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
            log.write(row)
            running, steps_in_row, tick, seen = torch.zeros((), device=device), 0, time.perf_counter(), 0
        if done % cfg.eval_every == 0 or done == cfg.steps:
            scores = evaluate(model, val_set, mean_t, std_t, cfg, val_limit)
            log.write({"step": done, "val/miou": scores["miou"], "val/pixel_acc": scores["pixel_acc"]})
        if done % cfg.ckpt_every == 0 or done == end:
            save_run(out, "mimkit-segment", asdict(cfg), done, model, opt)
    bar.close()
    if scores is None and end == cfg.steps:
        scores = evaluate(model, val_set, mean_t, std_t, cfg, val_limit)
    return {**(scores or {}), "steps": end}


def draw_examples(model: Segmenter, dataset, mean, std, cfg: SegmentConfig, path: str | Path, title: str,
                  count: int = 6) -> Path:
    """image | label | prediction for the first `count` validation images, titled (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device = next(model.parameters()).device
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    model.eval()
    count = min(count, len(dataset))
    fig, axes = plt.subplots(3, count, figsize=(1.8 * count, 5.8), squeeze=False)
    cmap = plt.get_cmap("tab20", max(dataset.num_classes, 2))
    for i in range(count):
        image, label = dataset[i]
        pred = predict(model, image, mean_t, std_t, cfg)
        shown = to_unit_float(image)
        axes[0, i].imshow((shown[0] if shown.shape[0] == 1 else shown[:3].permute(1, 2, 0)).numpy(), cmap="gray")
        for row, target in ((1, label), (2, pred)):
            masked = torch.where(target == dataset.ignore_index, -1, target).float()
            axes[row, i].imshow(masked.numpy(), cmap=cmap, vmin=-0.5, vmax=dataset.num_classes - 0.5,
                                interpolation="nearest")
    for row, name in enumerate(("image", "label", "prediction")):
        axes[row, 0].set_ylabel(name)
    return save_titled(fig, path, title)


def segment_transfer(timm_spec: tuple[str, dict], state: dict, description: str, data: str, cfg: SegmentConfig,
                     out: str | Path, mean: list | None = None, std: list | None = None, device="cpu",
                     resume: bool = False, val_limit: int | None = None, quiet: bool = False, log=print,
                     train_set=None) -> dict:
    """The whole protocol for one encoder (timm name + kwargs, weights): seg:DIR's splits, the model, training, the
    scores and the picture; `mean`/`std` None: the data's own. The result `eval segment` prints."""
    from mimkit.data.segmentation import segmentation_split
    start = time.time()
    train_set = segmentation_split(data, "train") if train_set is None else train_set   # opened once by a caller
    val_set = segmentation_split(data, "val")
    name, kwargs = timm_spec
    if kwargs.get("in_chans", 3) != train_set.channels:
        raise ValueError(f"the encoder takes {kwargs.get('in_chans', 3)}-channel images but {data} holds "
                         f"{train_set.channels}-channel ones; segment data of the encoder's channel count")
    mean, std = (mean, std) if mean is not None else (train_set.mean, train_set.std)
    if name.startswith("beit") and cfg.inference == "whole":
        raise ValueError("an encoder with relative position tables (timm Beit) is rebuilt at the crop size and takes "
                         "no other; set inference: slide (windows of crop_size) in the segment recipe")
    model = Segmenter(dense_encoder(name, kwargs, state, cfg.drop_path, cfg.output_stride, cfg.crop_size),
                      train_set.num_classes, cfg)
    params = count_parameters(model)
    log(f"eval segment: {cfg.head} head ({params['head']:,} parameters) on {description} ({params['encoder']:,} "
        f"parameters{', frozen' if cfg.frozen else ''}); {len(train_set)} train / {len(val_set)} val images, "
        f"{train_set.num_classes} classes")
    result = train_segmenter(model, train_set, val_set, mean, std, cfg, out, resume, device, quiet=quiet,
                             val_limit=val_limit)
    picture = draw_examples(model, val_set, mean, std, cfg, Path(out) / "segment-examples.png",
                            f"eval segment: {cfg.head}{' (frozen)' if cfg.frozen else ''} on {description} - val "
                            f"mIoU {result['miou']:.1f}")
    return {"protocol": "segment", "miou": result["miou"], "pixel_acc": result["pixel_acc"],
            "per_class_iou": result["per_class_iou"], "head": cfg.head, "frozen": cfg.frozen, "encoder": description,
            "steps": result["steps"], "n_train": len(train_set),
            "n_val": min(len(val_set), val_limit or len(val_set)), "params_encoder": params["encoder"],
            "params_head": params["head"], "out": str(out), "picture": str(picture),
            "wall_s": round(time.time() - start, 1)}
