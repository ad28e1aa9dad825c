"""Datasets: Fashion-MNIST / any gzipped IDX pair, and folders of images (class sub-folders or flat).

Every dataset yields (image, label, skipped): image is a uint8 [C, H, W] tensor (float for .npy arrays),
label an int (-1 when unlabelled), skipped 1 when the requested file could not be decoded and a
neighbour was returned instead (the trainer counts these).
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = [0.2860], [0.3530]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
ARRAY_EXTENSIONS = {".npy"}


class DataError(ValueError):
    """A dataset problem, with a sentence that says how to fix it."""


def read_idx(path: Path) -> np.ndarray:
    """Reads a (gzipped) IDX file as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file; re-download or point --data at a valid IDX directory")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class IDXDataset(Dataset):
    """An IDX image/label pair in memory (Fashion-MNIST's layout: `{split}-images-idx3-ubyte.gz`)."""

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        prefix = {"train": "train", "test": "t10k", "val": "t10k"}[split]
        images = sorted(root.glob(f"{prefix}-images-idx3-ubyte*"))
        labels = sorted(root.glob(f"{prefix}-labels-idx1-ubyte*"))
        if not root.is_dir():
            raise DataError(_missing_fmnist(root))
        if not images:
            raise DataError(f"no '{prefix}-images-idx3-ubyte[.gz]' file in {root}; " + _missing_fmnist(root, short=True))
        arr = read_idx(images[0])
        self.images = torch.from_numpy(arr.copy()).unsqueeze(1)              # [N, 1, H, W] uint8
        self.labels = torch.from_numpy(read_idx(labels[0]).astype(np.int64)) if labels else torch.full((len(arr),), -1)
        if len(self.images) == 0:
            raise DataError(f"{images[0]} holds no images; point --data at a non-empty dataset")
        self.channels = 1
        self.mean, self.std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if "fashion" in str(root).lower() else \
            _stats_from_uint8(self.images[:4096])
        self.num_classes = int(self.labels.max()) + 1
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index]), 0


def _stats_from_uint8(images: torch.Tensor) -> tuple[list, list]:
    x = images.float() / 255
    dims = [0] + list(range(2, x.ndim))
    return x.mean(dims).tolist(), x.std(dims).clamp(min=1e-3).tolist()


def _missing_fmnist(root: Path, short: bool = False) -> str:
    fix = ("install it with 'apt-get update && apt-get install -y dataset-fashion-mnist', or set MIMKIT_DATA_DIR / "
           "use --data idx:DIR to point at a directory holding the IDX files")
    return fix if short else f"dataset directory {root} does not exist; {fix}"


class ImageFolderDataset(Dataset):
    """Images under DIR: class sub-folders (labelled) or a flat folder (unlabelled, label -1).

    Files that can't be decoded are skipped with a warning: the next decodable file is returned and
    flagged, so the trainer can count them. `.npy` files hold [C, H, W] arrays (any channel count).
    """

    def __init__(self, root: str | Path, channels: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist; check the path given to --data folder:DIR")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files, labels = [], []
        if classes:
            for label, name in enumerate(classes):
                found = _list_files(root / name)
                files += found
                labels += [label] * len(found)
        else:
            files = _list_files(root)
            labels = [-1] * len(files)
        if not files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS | ARRAY_EXTENSIONS))}) found in {root}; "
                            f"put images there or in class sub-folders")
        self.root, self.files, self.labels, self.classes = root, files, labels, classes
        self.num_classes = len(classes) if classes else 0
        self.skipped = 0
        first = self._first_decodable()
        self.channels = channels or first.shape[0]
        self.mean, self.std = self._estimate_stats()

    def _first_decodable(self) -> torch.Tensor:
        for path in self.files[:64]:
            try:
                return self.load(path)
            except Exception:
                continue
        raise DataError(f"none of the first 64 files in {self.root} could be decoded; check that they are images")

    def _estimate_stats(self, count: int = 256) -> tuple[list, list]:
        step = max(1, len(self.files) // count)
        sums, sq, n = None, None, 0
        for path in self.files[::step][:count]:
            try:
                x = self.load(path).float()
            except Exception:
                continue
            x = x / 255 if self.is_uint8 else x
            flat = x.reshape(x.shape[0], -1)
            sums = flat.sum(1) if sums is None else sums + flat.sum(1)
            sq = (flat ** 2).sum(1) if sq is None else sq + (flat ** 2).sum(1)
            n += flat.shape[1]
        mean = sums / n
        std = (sq / n - mean ** 2).clamp(min=1e-6).sqrt()
        return mean.tolist(), std.tolist()

    @property
    def is_uint8(self) -> bool:
        return self.files[0].suffix.lower() not in ARRAY_EXTENSIONS

    def load(self, path: Path) -> torch.Tensor:
        if path.suffix.lower() in ARRAY_EXTENSIONS:
            arr = np.load(path)
            if arr.ndim == 2:
                arr = arr[None]
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        from PIL import Image
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "RGB", "RGBA", "I;16", "I", "F"):
                img = img.convert("RGB")
            if img.mode in ("I;16", "I", "F"):
                img = img.convert("L")
            arr = np.asarray(img, dtype=np.uint8)
        tensor = torch.from_numpy(arr.copy())
        return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                image = self.load(self.files[i])
            except Exception as err:  # undecodable file: warn, count, use a neighbour
                warnings.warn(f"skipping {self.files[i]}: it could not be decoded ({type(err).__name__}: {err})")
                continue
            if image.shape[0] != self.channels:
                image = _match_channels(image, self.channels, self.files[i])
            return image, self.labels[i], int(offset > 0)
        raise DataError(f"no image in {self.root} could be decoded")


def _match_channels(image: torch.Tensor, channels: int, path: Path) -> torch.Tensor:
    if channels == 1 and image.shape[0] in (3, 4):
        return image[:3].float().mean(0, keepdim=True).round().to(image.dtype)
    if channels == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    if channels == 3 and image.shape[0] == 4:
        return image[:3].contiguous()
    raise DataError(f"{path} has {image.shape[0]} channels but the dataset has {channels}; "
                    f"store all images with the same channel count")


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS | ARRAY_EXTENSIONS)


class SyntheticDataset(Dataset):
    """Random uint8 images, the same for the same index: for benchmarks and smoke tests (`synthetic:CxHxW`)."""

    def __init__(self, channels: int, height: int, width: int, length: int = 100_000):
        self.channels, self.size, self.length = channels, (height, width), length
        self.mean, self.std = [0.5] * channels, [0.29] * channels
        self.num_classes, self.skipped = 0, 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(index)
        return torch.randint(0, 256, (self.channels, *self.size), dtype=torch.uint8, generator=gen), -1, 0


def resolve_spec(spec: str) -> tuple[str, Path]:
    """'fashion-mnist' | 'idx:DIR' | 'folder:DIR' | 'synthetic:CxHxW' -> (kind, path-or-shape)."""
    if spec in ("fashion-mnist", "fmnist"):
        return "idx", Path(os.environ.get("MIMKIT_DATA_DIR", FASHION_MNIST_DIR))
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("idx", "folder", "synthetic") or not path:
        raise DataError(f"unknown data spec '{spec}'; use fashion-mnist, idx:DIR, folder:DIR or synthetic:CxHxW")
    return kind, Path(path).expanduser()


def build_dataset(spec: str, split: str = "train"):
    """The dataset a spec names; for folders, DIR/train and DIR/val (or DIR/test) are the splits when present."""
    kind, path = resolve_spec(spec)
    if kind == "synthetic":
        try:
            c, h, w = (int(v) for v in str(path).lower().split("x"))
        except ValueError:
            raise DataError(f"synthetic data needs a shape like synthetic:3x224x224, not '{spec}'") from None
        return SyntheticDataset(c, h, w)
    if kind == "idx":
        return IDXDataset(path, split)
    if split == "train":
        return ImageFolderDataset(path / "train" if (path / "train").is_dir() else path)
    for name in ("val", "test"):
        if (path / name).is_dir():
            return ImageFolderDataset(path / name)
    raise DataError(f"{path} has no 'val' or 'test' sub-folder; evaluation needs DIR/train and DIR/val with class sub-folders")
