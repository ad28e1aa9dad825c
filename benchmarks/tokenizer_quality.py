"""Reconstruction quality of tokenizers next to the two baselines a tokenizer must beat: a constant image at the
data mean, and the image down-sampled by the tokenizer's factor and up-sampled again (the information of one
float per token). Prints a Markdown table.

    python benchmarks/tokenizer_quality.py runs/tok-dvae runs/tok-vq --num-images 2000
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mimkit.data import build_dataset
from mimkit.tokenizers import load_tokenizer
from mimkit.tokenizers.evaluate import evaluate_tokenizer, unit_images


def per_image_psnr(recon: torch.Tensor, x: torch.Tensor) -> float:
    mse = (recon.clamp(0, 1) - x).pow(2).mean((1, 2, 3)).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizers", nargs="+")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--num-images", type=int, default=2000)
    args = parser.parse_args()
    dataset = build_dataset(args.data, "test")
    loaded = [(path, load_tokenizer(path)) for path in args.tokenizers]
    x = unit_images(dataset, list(range(min(args.num_images, len(dataset)))), loaded[0][1])
    factor = loaded[0][1].downsample
    mean = x.mean((0, 2, 3), keepdim=True).expand_as(x)
    small = F.interpolate(x, scale_factor=1 / factor, mode="area")
    rows = [("constant data mean", per_image_psnr(mean, x), "", ""),
            (f"{factor}x down (area) / up (bicubic)", per_image_psnr(F.interpolate(small, size=x.shape[-2:],
                                                                                  mode="bicubic"), x), "", "")]
    for path, tokenizer in loaded:
        result = evaluate_tokenizer(tokenizer, dataset, args.num_images)
        rows.append((f"{tokenizer.kind} {path}", result["psnr"], f"{result['codes_used']}/{result['vocab_size']}",
                     f"{result['perplexity']:.0f}"))
    print(f"| reconstruction of {len(x)} test images | PSNR (dB, per image) | codes used | perplexity |")
    print("|---|---|---|---|")
    for name, psnr, used, perplexity in rows:
        print(f"| {name} | {psnr:.2f} | {used} | {perplexity} |")


if __name__ == "__main__":
    main()
