"""End-to-end fine-tuning of a pre-trained encoder (BEiT/MAE/CAE/CIM protocol) with timm's parts:
layer-wise lr decay (`param_groups_layer_decay`), AdamW, cosine schedule with warm-up, drop path, label
smoothing, Mixup/CutMix and RandAugment. Reports the best and the final top-1."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import timm
import torch
from PIL import Image, ImageOps
from timm.data import Mixup
from timm.data.auto_augment import posterize, rand_augment_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch.utils.data import DataLoader

from mimkit.data import Augmented, EvalTransform, PretrainTransform, ResumableSampler, to_unit_float


@dataclass
class FinetuneConfig:
    epochs: int = 100
    batch_size: int = 128                 # per step
    base_lr: float = 7.5e-4               # lr = base_lr x batch / 256
    min_lr: float = 1e-6
    layer_decay: float = 0.8
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 5.0
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    randaug: str | None = "rand-m9-mstd0.5-inc1"   # timm RandAugment spec (9 / 0.5); null = off
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    pool: str = "mean"                    # classifier pooling: mean (global average + fc_norm) or cls
    num_workers: int = 2
    seed: int = 0


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for 0 bits (the increasing variant at magnitude 10), which recent Pillow (13 here)
    refuses and older Pillow turned into a black image; this keeps the older result."""
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


class FinetuneTransform(PretrainTransform):
    """RandomResizedCrop + flip, then timm's RandAugment on 1- or 3-channel 8-bit images."""

    def __init__(self, size, cfg: FinetuneConfig, mean):
        super().__init__(size, cfg.crop_scale)
        # PIL fills a grayscale image with an int, an RGB one with a triple
        fill = int(round(255 * mean[0])) if len(mean) == 1 else tuple(int(round(255 * m)) for m in mean[:3])
        self.randaug = rand_augment_transform(cfg.randaug, {"img_mean": fill}) if cfg.randaug else None
        for op in getattr(self.randaug, "ops", []):
            if op.aug_fn is posterize:
                op.aug_fn = posterize_any_bits

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        out = super().__call__(image, seed)
        if self.randaug is None or out.dtype != torch.uint8 or out.shape[0] not in (1, 3):
            return out
        arr = out.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[..., 0] if out.shape[0] == 1 else arr)
        back = torch.from_numpy(np.asarray(self.randaug(pil.convert("RGB") if out.shape[0] == 3 else pil)).copy())
        return back.unsqueeze(0) if back.ndim == 2 else back.permute(2, 0, 1).contiguous()


def classifier_from_encoder(timm_name: str, timm_kwargs: dict, encoder_state: dict, num_classes: int,
                            cfg: FinetuneConfig) -> torch.nn.Module:
    """A timm classifier with the encoder's weights; mean pooling uses timm's fc_norm (as MAE's fine-tune)."""
    cnn = "embed_dim" not in timm_kwargs        # a ResNet: global average pooling, whatever cfg.pool says
    kwargs = dict(timm_kwargs, num_classes=num_classes, global_pool="avg" if cfg.pool == "mean" or cnn else "token")
    kwargs.pop("fc_norm", None)                 # an export's probing pool; fine-tuning uses timm's own (MAE's)
    kwargs.pop("use_fc_norm", None)
    model = timm.create_model(timm_name, pretrained=False, drop_path_rate=cfg.drop_path, **kwargs)
    result = model.load_state_dict(encoder_state, strict=False)
    allowed_missing = ("head.", "fc_norm.", "fc.")   # a new classifier (ViT: head / fc_norm, ResNet: fc)
    if any(not k.startswith(allowed_missing) for k in result.missing_keys):
        raise ValueError(f"the encoder's weights do not fit {timm_name}: missing {result.missing_keys[:4]}")
    return model


def finetune_param_groups(model: torch.nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """timm's layer-wise lr decay groups (each with an `lr_scale`), weight decay off for 1-D params and tokens."""
    return param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                    no_weight_decay_list=list(getattr(model, "no_weight_decay", set)()))


def finetune(model: torch.nn.Module, train_set, test_set, img_size, mean, std, cfg: FinetuneConfig,
             device: str | torch.device = "cpu", log=print) -> dict:
    if len(train_set) < cfg.batch_size:   # every batch is full (drop_last): a smaller set would train no step
        raise ValueError(f"fine-tuning on {len(train_set)} train images cannot fill one batch of {cfg.batch_size}; "
                         f"use more images (--train-limit) or a smaller batch (--set batch_size={max(1, len(train_set))})")
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    num_classes = model.num_classes
    lr = cfg.base_lr * cfg.batch_size / 256
    opt = torch.optim.AdamW(finetune_param_groups(model, cfg), lr=lr, betas=tuple(cfg.betas))
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                  num_classes=num_classes) if (cfg.mixup > 0 or cfg.cutmix > 0) else None
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    train_data = Augmented(train_set, FinetuneTransform(img_size, cfg, mean))

    def epoch_loader(epoch: int) -> DataLoader:  # (index, seed) pairs: every image gets its own crop, every epoch
        return DataLoader(train_data, batch_size=cfg.batch_size, drop_last=True, num_workers=cfg.num_workers,
                          sampler=ResumableSampler(len(train_set), cfg.seed, epoch),
                          generator=torch.Generator().manual_seed(cfg.seed))

    train_loader = epoch_loader(0)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    steps_per_epoch = len(train_loader)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    history, step, start = [], 0, time.time()
    for epoch in range(cfg.epochs):
        model.train()
        for images, labels, _ in epoch_loader(epoch):
            now = lr * (step + 1) / warmup if step < warmup else \
                cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
            for group in opt.param_groups:
                group["lr"] = now * group.get("lr_scale", 1.0)
            x = normalise(images.to(device), mean_t, std_t)
            y = labels.to(device)
            if mixup:
                x, y = mixup(x, y)
            with autocast:
                loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        acc = evaluate(model, test_set, img_size, mean_t, std_t, device)
        history.append({"epoch": epoch + 1, "top1": acc, "loss": loss.item()})
        log(f"[finetune] epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.4f} top1 {acc:.2f}")
    return {"best_top1": max(h["top1"] for h in history), "final_top1": history[-1]["top1"],
            "epochs": cfg.epochs, "wall_s": round(time.time() - start, 1), "history": history}


def normalise(x: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor) -> torch.Tensor:
    x = to_unit_float(x)
    return (x - mean_t) / std_t


@torch.no_grad()
def evaluate(model, dataset, img_size, mean_t, std_t, device, transform=None, batch_size: int = 512) -> float:
    """Top-1 (%) of a classifier on `dataset`; `transform(images uint8/float, index) -> images` corrupts on the fly."""
    model.eval().to(device)
    loader = DataLoader(Augmented(dataset, EvalTransform(img_size)), batch_size=batch_size, shuffle=False)
    correct = total = 0
    for images, labels, _ in loader:
        if transform is not None:
            images = transform(images)
        logits = model(normalise(images.to(device), mean_t, std_t))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total
