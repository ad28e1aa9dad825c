"""Datasets: Fashion-MNIST / any gzipped IDX pair, and folders of images (class sub-folders or flat).

Every dataset yields (image, label, skipped): image is a uint8 [C, H, W] tensor (float for .npy arrays),
label an int (-1 when unlabelled), skipped 1 when the requested file could not be decoded and a
neighbour was returned instead (the trainer counts these). 16-bit images become float in [0, 1].
"""
from __future__ import annotations

import gzip
import os
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = [0.2860], [0.3530]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
JPEG_EXTENSIONS = {".jpg", ".jpeg"}
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


def write_idx(path: Path, array: np.ndarray) -> None:
    """Writes an unsigned-byte IDX file, gzipped when the name ends in .gz (e.g. a subset or another data set in
    Fashion-MNIST's layout, for `--data idx:DIR`)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


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

    def __init__(self, root: str | Path, channels: int | None = None, announce=None):
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
        sample = self._decodable_sample()
        found = sorted({x.shape[0] for x in sample})
        self.channels = channels or max(found, key=lambda c: sum(x.shape[0] == c for x in sample))
        self.dtype = sample[0].dtype       # uint8, or float32 for 16-bit images and arrays
        if found != [self.channels]:
            what = f"mixes images with {' and '.join(map(str, found))} channels" if len(found) > 1 else \
                f"holds {found[0]}-channel images"
            (announce or _note)(f"{root} {what}; converting every image to {self.channels} channels "
                                f"({'data.channels' if channels else 'the majority'}; set data.channels to choose)")
        self.mean, self.std = self._estimate_stats([self._conform(x, self.files[0]) for x in sample])

    def _decodable_sample(self, count: int = 256) -> list[torch.Tensor]:
        """Up to `count` decoded images spread over the folder (for the channel count and mean/std)."""
        step = max(1, len(self.files) // count)
        sample = []
        for path in self.files[::step][:count]:
            try:
                sample.append(self.load(path))
            except DataError:
                raise
            except Exception:
                continue
        if not sample:
            raise DataError(f"none of the sampled files in {self.root} could be decoded; check that they are images")
        return sample

    @staticmethod
    def _estimate_stats(sample: list[torch.Tensor]) -> tuple[list, list]:
        sums, sq, n = None, None, 0
        for x in sample:
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            flat = x.reshape(x.shape[0], -1)
            sums = flat.sum(1) if sums is None else sums + flat.sum(1)
            sq = (flat ** 2).sum(1) if sq is None else sq + (flat ** 2).sum(1)
            n += flat.shape[1]
        mean = sums / n
        std = (sq / n - mean ** 2).clamp(min=1e-6).sqrt()
        return mean.tolist(), std.tolist()

    @staticmethod
    def load(path: Path) -> torch.Tensor:
        """One file as [C, H, W]: uint8 for 8-bit images, float32 in [0, 1] for 16-bit ones, float32 as stored
        for .npy arrays (which must be finite)."""
        return ImageFolderDataset.load_bytes(path.read_bytes(), path)

    @staticmethod
    def load_bytes(data: bytes, path: Path) -> torch.Tensor:
        """`load` of a file's bytes (`path` names it: its suffix picks the decoder, and it is in messages)."""
        import io
        if path.suffix.lower() in ARRAY_EXTENSIONS:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.ndim == 2:
                arr = arr[None]
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if not np.isfinite(arr).all():
                raise DataError(f"{path} holds NaN or infinite values; fix or remove that file")
            return torch.from_numpy(arr)
        from PIL import Image, UnidentifiedImageError
        try:
            opened = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:      # PIL's own message names its BytesIO, not the file
            raise UnidentifiedImageError(f"{path.name} is not in an image format PIL reads") from None
        with opened as img:
            img.load()
            if img.mode.startswith("I;16") or img.mode == "I":     # 16-bit PNG/TIFF: scale the full range to [0, 1]
                arr = np.asarray(img).astype(np.float32) / 65535.0
            elif img.mode == "F":
                arr = np.asarray(img, dtype=np.float32)
            else:
                if img.mode not in ("L", "RGB", "RGBA"):
                    img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
                arr = np.asarray(img, dtype=np.uint8)
        tensor = torch.from_numpy(arr.copy())
        return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()

    def _conform(self, image: torch.Tensor, path: Path) -> torch.Tensor:
        """The dataset's channel count and dtype (8-bit and 16-bit files may be mixed)."""
        if image.shape[0] != self.channels:
            image = _match_channels(image, self.channels, path)
        if image.dtype != self.dtype:
            image = image.float() / 255 if image.dtype == torch.uint8 else (image * 255).round().clamp(0, 255).to(torch.uint8)
        return image

    def __len__(self) -> int:
        return len(self.files)

    def jpeg_bytes(self, index: int) -> torch.Tensor | None:
        """A JPEG file's encoded bytes (None for other formats), for batched decoding (`decode_jpegs`)."""
        path = self.files[index]
        if path.suffix.lower() not in JPEG_EXTENSIONS:
            return None
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)

    def decode_jpegs(self, indices: list[int], device: str | torch.device = "cpu") -> list[torch.Tensor | None]:
        """The JPEGs among `indices` decoded together with torchvision.io.decode_jpeg (on `device`), conformed to the
        dataset's channels and dtype; None where a file is not a JPEG or does not decode (the caller then takes the
        per-file path, which skips it and counts it)."""
        encoded = [self.jpeg_bytes(i) for i in indices]
        decoded = decode_jpeg_batch([e for e in encoded if e is not None], self.channels, device)
        out, it = [], iter(decoded)
        for i, e in zip(indices, encoded):
            image = next(it) if e is not None else None
            out.append(None if image is None else self._conform(image, self.files[i]))
        return out

    def __getitem__(self, index: int):
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                image = self.load(self.files[i])
            except DataError:
                raise
            except Exception as err:  # undecodable file: warn, count, use a neighbour
                warnings.warn(f"skipping {self.files[i]}: it could not be decoded ({type(err).__name__}: {err})")
                continue
            return self._conform(image, self.files[i]), self.labels[i], int(offset > 0)
        raise DataError(f"no image in {self.root} could be decoded")


def decode_jpeg_batch(encoded: list[torch.Tensor], channels: int, device: str | torch.device = "cpu"
                      ) -> list[torch.Tensor | None]:
    """Encoded JPEGs (1-D uint8) -> [C, H, W] uint8 on `device`, in one torchvision.io.decode_jpeg call (nvjpeg on
    CUDA); if the batch fails, one by one, None for each file that does not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg
    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(channels, ImageReadMode.UNCHANGED)
    with warnings.catch_warnings():   # torchvision 0.29 deprecates its decoders for TorchCodec's; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=mode, device=device)) if encoded else []
        except RuntimeError:          # one bad file fails the batch
            out = []
            for e in encoded:
                try:
                    out.append(decode_jpeg(e, mode=mode, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def _note(message: str) -> None:
    print(f"mimkit: note: {message}", file=sys.stderr, flush=True)


def _match_channels(image: torch.Tensor, channels: int, path: Path) -> torch.Tensor:
    """Grayscale, RGB and RGBA into one another (gray = mean of RGB; alpha dropped, or opaque when added)."""
    have = image.shape[0]
    if have in (1, 3, 4) and channels in (1, 3, 4):
        if channels == 1:
            gray = image[:3].float().mean(0, keepdim=True)
            return gray.round().to(image.dtype) if image.dtype == torch.uint8 else gray
        rgb = image.expand(3, -1, -1) if have == 1 else image[:3]
        if channels == 3:
            return rgb.contiguous()
        opaque = torch.full_like(image[:1], 255 if image.dtype == torch.uint8 else 1)
        return image.contiguous() if have == 4 else torch.cat([rgb, opaque])
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
    if not sep or kind not in ("idx", "folder", "synthetic", "shards") or not path:
        raise DataError(f"unknown data spec '{spec}'; use fashion-mnist, idx:DIR, folder:DIR, shards:DIR_OR_PATTERN "
                        f"or synthetic:CxHxW")
    return kind, Path(path).expanduser()


def build_dataset(spec: str, split: str = "train", channels: int | None = None, max_missing: float = 0.01,
                  announce=None):
    """The dataset a spec names; for folders, DIR/train and DIR/val (or DIR/test) are the splits when present.
    `channels` (data.channels) converts a folder's images to that many channels; `max_missing` (data.max_missing)
    is the share of a shard pack's samples damaged shards may lack, `announce` prints the warning when they do."""
    kind, path = resolve_spec(spec)
    if kind == "shards":
        if split != "train":
            raise DataError(f"shards hold a training set to stream; evaluate on a labelled folder or IDX set "
                            f"(--data folder:DIR), not '{spec}'")
        from mimkit.data.shards import ShardStream
        return ShardStream(spec.partition(":")[2], channels, max_missing=max_missing, announce=announce)
    if kind == "synthetic":
        try:
            c, h, w = (int(v) for v in str(path).lower().split("x"))
        except ValueError:
            raise DataError(f"synthetic data needs a shape like synthetic:3x224x224, not '{spec}'") from None
        return SyntheticDataset(c, h, w)
    if kind == "idx":
        return IDXDataset(path, split)
    if split == "train":
        return ImageFolderDataset(path / "train" if (path / "train").is_dir() else path, channels)
    for name in ("val", "test"):
        if (path / name).is_dir():
            return ImageFolderDataset(path / name, channels)
    raise DataError(f"{path} has no 'val' or 'test' sub-folder; evaluation needs DIR/train and DIR/val with class sub-folders")
