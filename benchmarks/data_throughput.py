"""Images/s of the pre-training data path: per-image (PIL decode + torchvision RandomResizedCrop in the workers), batched
decode (one torchvision.io.decode_jpeg call per worker batch) with the workers' crops (mimkit's default on a CPU), and
batched decode with the crops of the whole batch in one call on the training device (the default on CUDA). Same
folder, same workers, same boxes.

    python benchmarks/data_throughput.py [--dir DIR] [--images 2000] [--workers 2] [--batch 256] [--device cpu]

Without --dir it first writes `--images` 500 x 375 JPEGs (ImageNet's typical size) to a temporary folder. Prints a
table; the time includes everything up to normalised images on the device, as the trainer consumes them.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimkit.data import Augmented, PretrainTransform, ResumableSampler, to_unit_float
from mimkit.data.batched import BatchedCrops, pad_collate, resized_crops
from mimkit.data.datasets import ImageFolderDataset


def write_jpegs(folder: Path, count: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(count):
        cls = folder / f"class{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        base = np.kron(rng.random((15, 20, 3)), np.ones((25, 25, 1)))           # smooth shapes ...
        arr = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)              # ... with photo-like noise
        Image.fromarray((arr * 255).astype(np.uint8)).save(cls / f"{i:05d}.jpg", quality=90)


class PerFile(torch.utils.data.Dataset):
    """The dataset without its batched decoder: every image through PIL, one at a time (mimkit's former path)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


def measure(dataset, transform, batched: bool, workers: int, batch: int, device: torch.device, size) -> float:
    data = BatchedCrops(dataset, transform) if batched else Augmented(dataset, transform)
    sampler = ResumableSampler(len(dataset), seed=0, epoch=0)
    loader = DataLoader(data, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                        collate_fn=pad_collate if batched else None, persistent_workers=False)
    start, seen = time.perf_counter(), 0
    for item in loader:
        x = to_unit_float(item[0].to(device))
        if batched:
            x = resized_crops(x, item[3], size, transform.interpolation)
        x = (x - 0.45) / 0.25
        seen += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        if args.dir is None:
            write_jpegs(folder, args.images)
        dataset = ImageFolderDataset(folder)
        device = torch.device(args.device)
        transform = PretrainTransform((args.size, args.size), (0.2, 1.0), interpolation=args.interpolation)
        print(f"# {len(dataset)} JPEGs from {folder if args.dir else 'a temporary folder (500 x 375)'} -> "
              f"{args.size} px crops ({args.interpolation}), batch {args.batch}, {args.workers} workers, "
              f"device {device}, {torch.get_num_threads()} threads")
        print("| path | images/s | x per-image |\n|---|---|---|")
        paths = (("per-image: PIL decode + RandomResizedCrop, in the workers", PerFile(dataset), False),
                 ("batched decode (decode_jpeg per worker batch) + per-image crops in the workers", dataset, False),
                 ("batched decode + one batched crop call on the device", dataset, True))
        base = None
        for name, data, batched in paths:
            rate = measure(data, transform, batched, args.workers, args.batch, device, (args.size, args.size))
            base = base or rate
            print(f"| {name} | {rate:.0f} | {rate / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
