"""Semantic segmentation data: `--data seg:DIR` reads two layouts, and `mimkit data make-segmentation` builds a
benchmark in the second from Fashion-MNIST.

- ADE20K's release (ADEChallengeData2016): `images/{training,validation}/*.jpg` and
  `annotations/{training,validation}/*.png`. Label 0 ("other objects") is ignored and 1..150 become 0..149, as in
  every ADE20K codebase (mmsegmentation's `reduce_zero_label`); class names from `objectInfo150.txt` when present.
- Generic: `classes.json` ({"classes": [names], "ignore_index": 255}), and for each split (`train`, `val`)
  `SPLIT/images/NAME.{png,jpg,...}` with `SPLIT/labels/NAME.png` (one class index per pixel, or the ignore index).
  Label values are taken as they are: no shift.

Bad input is one sentence (exit 2): an image without a label map (when the folder is opened), a label map of another
size than its image, a label value beyond the declared classes (when the sample is read).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mimkit.data.datasets import IMAGE_EXTENSIONS, DataError, ImageFolderDataset, _match_channels

ADE_SPLITS = {"train": "training", "val": "validation"}
IGNORE = 255
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


class SegmentationFolder(Dataset):
    """(image [C, H, W] uint8, label [H, W] int64) pairs of one split; `classes`, `ignore_index`, `channels`,
    `mean`, `std` describe them."""

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        if split not in ADE_SPLITS:
            raise DataError(f"segmentation splits are train and val, not '{split}'")
        self.root, self.split = root, split
        if (root / "images" / ADE_SPLITS[split]).is_dir():
            self.layout, self.shift = "ade20k", True
            images, labels = root / "images" / ADE_SPLITS[split], root / "annotations" / ADE_SPLITS[split]
            self.classes, self.ignore_index = ade_class_names(root), IGNORE
        elif (root / "classes.json").is_file():
            self.layout, self.shift = "generic", False
            images, labels = root / split / "images", root / split / "labels"
            self.classes, self.ignore_index = read_classes(root / "classes.json")
        else:
            raise DataError(f"{root} is neither ADE20K's layout (images/{ADE_SPLITS[split]}/, annotations/"
                            f"{ADE_SPLITS[split]}/) nor the generic one (classes.json, {split}/images/, {split}/labels/); "
                            f"build a benchmark with 'mimkit data make-segmentation --out DIR'")
        if not images.is_dir():
            raise DataError(f"{images} does not exist; put the {split} images there")
        self.images = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.images:
            raise DataError(f"no images in {images}")
        self.labels = [labels / f"{p.stem}.png" for p in self.images]
        lost = [p.name for p, q in zip(self.images, self.labels) if not q.is_file()]
        if lost:
            raise DataError(f"{len(lost)} image(s) in {images} have no label map in {labels} (e.g. {lost[0]} needs "
                            f"{Path(lost[0]).stem}.png); add them or remove those images")
        self._check_sizes()
        sample = [self.image(i) for i in range(0, len(self.images), max(1, len(self.images) // 64))[:64]]
        self.channels = max({x.shape[0] for x in sample}, key=lambda c: sum(x.shape[0] == c for x in sample))
        self.mean, self.std = ImageFolderDataset._estimate_stats([x for x in sample if x.shape[0] == self.channels])

    def _check_sizes(self) -> None:
        """Every label map as large as its image, from the files' headers (no decoding)."""
        from PIL import Image
        for image, label in zip(self.images, self.labels):
            with Image.open(image) as a, Image.open(label) as b:
                if a.size != b.size:
                    raise DataError(f"{label} is {b.size[0]}x{b.size[1]} but its image {image.name} is "
                                    f"{a.size[0]}x{a.size[1]}; label maps must match their images pixel for pixel")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> torch.Tensor:
        return ImageFolderDataset.load(self.images[index])

    def label(self, index: int) -> torch.Tensor:
        from PIL import Image
        with Image.open(self.labels[index]) as img:
            arr = np.asarray(img)
        if arr.ndim != 2:
            raise DataError(f"{self.labels[index]} is not a one-channel label map (it has {arr.shape[-1]} channels); "
                            f"write class indices as an 8- or 16-bit grayscale or palette PNG")
        label = torch.from_numpy(arr.astype(np.int64))
        if self.shift:                      # ADE20K: 0 = other (ignored), 1..150 -> 0..149
            label = torch.where(label == 0, IGNORE, label - 1)
        wrong = (label >= self.num_classes) & (label != self.ignore_index)
        if wrong.any():
            raise DataError(f"{self.labels[index]} holds label {int(label[wrong].max()) + int(self.shift)}, beyond the "
                            f"{self.num_classes} classes declared{' in classes.json' if not self.shift else ''} "
                            f"(ignore index {self.ignore_index}); fix the label map or the class list")
        return label

    def __getitem__(self, index: int):
        image, label = self.image(index), self.label(index)      # sizes checked when the folder was opened
        if image.shape[0] != self.channels:
            image = _match_channels(image, self.channels, self.images[index])
        return image, label


def segmentation_split(spec: str, split: str) -> SegmentationFolder:
    """`seg:DIR` -> that folder's split."""
    kind, sep, path = spec.partition(":")
    if kind != "seg" or not path:
        raise DataError(f"segmentation data is given as seg:DIR (ADE20K's layout or the generic one), not '{spec}'")
    return SegmentationFolder(Path(path).expanduser(), split)


def ade_class_names(root: Path) -> list[str]:
    """ADE20K's 150 class names from objectInfo150.txt (Idx, Ratio, Train, Val, Name), else numbered."""
    info = root / "objectInfo150.txt"
    if info.is_file():
        rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
        names = [row[-1].split(";")[0].strip() for row in rows]
        if len(names) == 150:
            return names
    return [f"class {i}" for i in range(150)]


def read_classes(path: Path) -> tuple[list[str], int]:
    try:
        spec = json.loads(path.read_text())
        classes, ignore = spec["classes"], int(spec.get("ignore_index", IGNORE))
        assert isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"{path} must read {{\"classes\": [\"name\", ...], \"ignore_index\": 255}}") from None
    if 0 <= ignore < len(classes):
        raise DataError(f"{path}: ignore_index {ignore} is one of the {len(classes)} classes; pick a value outside "
                        f"0..{len(classes) - 1} (e.g. 255)")
    return classes, ignore


def make_segmentation(out: str | Path, source: str = "fashion-mnist", canvas: int = 64, train_count: int = 2000,
                      val_count: int = 500, items: tuple[int, int] = (1, 4), scale: tuple[float, float] = (0.75, 1.5),
                      seed: int = 0) -> dict:
    """Fashion-MNIST items (or another grayscale IDX set's) composed onto `canvas` x `canvas` black canvases
    (`compose_canvases`), written in the generic layout. Labels: 0 = background, the item's class + 1 where its
    pixel is foreground and not covered by a later item. Seeded: the same arguments write the same files."""
    from PIL import Image
    out = new_benchmark_folder(out)
    summary = {"canvas": canvas, "seed": seed, "items": list(items), "scale": list(scale)}
    for split, names, canvases in canvas_splits(source, canvas, train_count, val_count, items, scale, seed):
        (out / split / "images").mkdir(parents=True)
        (out / split / "labels").mkdir(parents=True)
        for n, (image, placed) in enumerate(canvases):
            label = np.zeros_like(image)
            for cls, mask in placed:
                label[mask] = cls + 1
            Image.fromarray(image).save(out / split / "images" / f"{n:06d}.png")
            Image.fromarray(label).save(out / split / "labels" / f"{n:06d}.png")
        summary[split] = train_count if split == "train" else val_count
    (out / "classes.json").write_text(json.dumps({"classes": ["background"] + names, "ignore_index": IGNORE,
                                                  "made_by": summary}, indent=1))
    return summary


def new_benchmark_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} is not an empty folder; pick a new one for the benchmark")
    return out


def canvas_splits(source: str, canvas: int, train_count: int, val_count: int, items: tuple[int, int],
                  scale: tuple[float, float], seed: int):
    """(split, class names, canvases) for train (from the source's train items) and val (from its test items),
    one seeded stream for both, so the same arguments give the same canvases."""
    from mimkit.data.datasets import IDXDataset, resolve_spec
    kind, path = resolve_spec(source)
    if kind != "idx":
        raise DataError(f"the canvas benchmarks compose items of an IDX set (fashion-mnist or idx:DIR), not '{source}'")
    rng = np.random.default_rng(seed)
    for split, source_split, count in (("train", "train", train_count), ("val", "test", val_count)):
        found = IDXDataset(path, source_split)
        names = FASHION_MNIST_CLASSES if found.num_classes == 10 else [f"class {i}" for i in range(found.num_classes)]
        yield split, names, compose_canvases(found.images[:, 0].numpy(), found.labels.numpy(), count, canvas, items,
                                             scale, rng)


def compose_canvases(pictures: np.ndarray, classes: np.ndarray, count: int, canvas: int, items: tuple[int, int],
                     scale: tuple[float, float], rng: np.random.Generator):
    """`count` canvases of 1 to 4 (`items`) garments each: (image uint8 [canvas, canvas], [(class, visible mask
    bool [canvas, canvas]) per item, in drawing order]).

    Each item is resized by a factor in `scale` (21-42 px from 28 px items) and placed uniformly at random wholly
    inside the black canvas; later items cover earlier ones where they overlap. An item's mask is its foreground
    (above 10 % of full intensity, so the resize's faint fringe stays background) that no later item covers; an
    item covered whole keeps an empty mask."""
    from PIL import Image
    for _ in range(count):
        image = np.zeros((canvas, canvas), np.uint8)
        owner = np.zeros((canvas, canvas), np.int16)         # 0: background, j + 1: the j-th item drawn
        placed = []
        for j in range(int(rng.integers(items[0], items[1] + 1))):
            k = int(rng.integers(len(pictures)))
            side = min(canvas, int(round(pictures.shape[1] * rng.uniform(*scale))))
            item = np.asarray(Image.fromarray(pictures[k]).resize((side, side), Image.BILINEAR))
            top, left = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
            fg = item > 25
            image[top:top + side, left:left + side][fg] = item[fg]
            owner[top:top + side, left:left + side][fg] = j + 1
            placed.append(int(classes[k]))
        yield image, [(cls, owner == j + 1) for j, cls in enumerate(placed)]
