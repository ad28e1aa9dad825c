"""Seeded, per-sample augmentations: the same (seed, epoch, index) always gives the same crop, on any worker.

That is what makes a resumed run reproduce the uninterrupted one.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode


def random_resized_crop_box(height: int, width: int, scale, ratio, gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling (10 tries, then a centre crop), drawn from `gen`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """8-bit images -> float in [0, 1]; float arrays (e.g. .npy data) pass through as float."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


class PretrainTransform:
    """RandomResizedCrop (bicubic or bilinear, antialiased) + horizontal flip, seeded per sample."""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True,
                 interpolation: str = "bicubic"):
        self.size, self.scale, self.ratio, self.hflip = list(size), tuple(scale), tuple(ratio), hflip
        self.interpolation = interpolation

    def draw(self, height: int, width: int, seed: int) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) of the sample with this seed: the same on the per-image and the batched path."""
        gen = torch.Generator().manual_seed(seed)
        top, left, h, w = random_resized_crop_box(height, width, self.scale, self.ratio, gen)
        return top, left, h, w, self.hflip and torch.rand(1, generator=gen).item() < 0.5

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        top, left, h, w, flip = self.draw(image.shape[-2], image.shape[-1], seed)
        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        out = TF.resized_crop(image, top, left, h, w, self.size, interpolation=mode, antialias=True)
        return TF.horizontal_flip(out) if flip else out


class EvalTransform:
    """Resize to the model's input size (no-op when it already matches)."""

    def __init__(self, size):
        self.size = list(size)

    def __call__(self, image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        if list(image.shape[-2:]) == self.size:
            return image
        return TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC, antialias=True)


class Augmented(torch.utils.data.Dataset):
    """Wraps a dataset; indices are (index, seed) pairs from `ResumableSampler`, or plain ints (seed = index,
    so that random transforms still differ from image to image)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, item)
        image, label, skipped = self.dataset[index]
        return self.finish(image, label, skipped, seed)

    def finish(self, image, label, skipped, seed):
        return self.transform(image, seed), label, skipped

    def __getitems__(self, items):
        """A worker's whole batch: its JPEGs decoded in one torchvision.io.decode_jpeg call (a folder's other formats,
        and files that fail to decode, take the per-file path, which skips and counts them)."""
        items = [item if isinstance(item, tuple) else (item, item) for item in items]
        if not hasattr(self.dataset, "decode_jpegs"):
            return [self[item] for item in items]
        decoded = self.dataset.decode_jpegs([index for index, _ in items])
        return [self[(index, seed)] if image is None else self.finish(image, self.dataset.labels[index], 0, seed)
                for (index, seed), image in zip(items, decoded)]
