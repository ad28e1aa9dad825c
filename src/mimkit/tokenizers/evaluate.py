"""How good a tokenizer is: reconstruction PSNR/SSIM through its tokens, codebook usage and perplexity
(`mimkit tokenizer eval`), and a picture of original | reconstruction | reconstruction with half the tokens
replaced by sampled ones, what CIM's enhancer sees (`mimkit tokenizer show`)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from mimkit.data import EvalTransform, to_unit_float
from mimkit.tokenizers.base import Tokenizer


def unit_images(dataset, indices, tokenizer: Tokenizer) -> torch.Tensor:
    """Dataset images in [0, 1] at the tokenizer's training size (or as they are)."""
    size = tokenizer.img_size or list(dataset[indices[0]][0].shape[-2:])
    transform = EvalTransform(size)
    images = torch.stack([to_unit_float(transform(dataset[i][0])) for i in indices]).clamp(0, 1)
    if images.shape[1] != tokenizer.in_chans:
        raise ValueError(f"the tokenizer was trained on {tokenizer.in_chans}-channel images but the data has "
                         f"{images.shape[1]} channels; evaluate it on data like its training data")
    tokenizer.grid_for(size)
    return images


@torch.no_grad()
def evaluate_tokenizer(tokenizer: Tokenizer, dataset, num_images: int = 2000, batch_size: int = 250,
                       device: str = "cpu") -> dict:
    tokenizer = tokenizer.to(device).eval()
    count = min(num_images, len(dataset))
    hits = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    psnr_sum = ssim_sum = 0.0
    for start in range(0, count, batch_size):
        x = unit_images(dataset, list(range(start, min(start + batch_size, count))), tokenizer).to(device)
        ids = tokenizer.encode(x)
        recon = tokenizer.decode(ids).float().clamp(0, 1)
        hits += torch.bincount(ids.flatten().cpu(), minlength=tokenizer.vocab_size).double()
        n = x.shape[0]
        psnr_sum += n * peak_signal_noise_ratio(recon, x, data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)).item()
        ssim_sum += n * structural_similarity_index_measure(recon, x, data_range=1.0).item()
    p = hits / hits.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"psnr": round(psnr_sum / count, 3), "ssim": round(ssim_sum / count, 4),
            "codes_used": int((hits > 0).sum()), "vocab_size": tokenizer.vocab_size,
            "usage": round(float((hits > 0).double().mean()), 4), "perplexity": round(math.exp(entropy), 1),
            "num_images": count, "grid": list(ids.shape[-2:]), "settings": tokenizer.settings()}


@torch.no_grad()
def corrupt_tokens(tokenizer: Tokenizer, images: torch.Tensor, ratio: float = 0.5,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, corrupted ids): a random `ratio` of positions take a code sampled from the tokenizer's own softmax
    at temperature 1 (a stand-in for CIM's generator, which samples from its own predictions)."""
    logits = tokenizer.logits(images).float()                                  # [B, V, h, w]
    ids = logits.argmax(1)
    b, v, h, w = logits.shape
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, v)
    sampled = torch.multinomial(probs, 1, generator=generator).view(b, h, w)
    chosen = torch.rand(b, h, w, generator=generator) < ratio
    return ids, torch.where(chosen.to(ids.device), sampled, ids)


@torch.no_grad()
def show_tokenizer(tokenizer: Tokenizer, dataset, out: str | Path, num_images: int = 8, seed: int = 0,
                   ratio: float = 0.5, name: str = "") -> Path:
    from mimkit.engine.logging import save_rows_grid
    tokenizer = tokenizer.cpu().eval()
    step = max(1, len(dataset) // num_images)
    x = unit_images(dataset, [i * step for i in range(num_images)], tokenizer)
    gen = torch.Generator().manual_seed(seed)
    ids, corrupted = corrupt_tokens(tokenizer, x, ratio, gen)
    rows = [("original", x), ("reconstruction", tokenizer.decode(ids).clamp(0, 1)),
            (f"{int(ratio * 100)} % tokens resampled", tokenizer.decode(corrupted).clamp(0, 1))]
    zero, one = torch.zeros(1, x.shape[1], 1, 1), torch.ones(1, x.shape[1], 1, 1)
    out = Path(out)
    save_rows_grid(rows, zero, one, out, title=f"{name or type(tokenizer).__name__}: {len(x)} test images, seed {seed}")
    return out
