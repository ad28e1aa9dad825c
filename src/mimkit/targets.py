"""Targets: what a reconstruction loss compares against (separate from the loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mimkit.patches import patchify


def patch_pixels(images: torch.Tensor, patch_size, normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C]; with `normalize`, each patch is standardised by its own mean and
    (unbiased) variance, MAE's `norm_pix_loss`."""
    target = patchify(images, patch_size)
    if normalize:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return target


def unnormalize_patches(pred: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse of `patch_pixels(..., normalize=True)`: a prediction in per-patch normalised space [..., N] back to
    pixels with the mean and (unbiased) variance of the `reference` patches [..., N] (the true ones: right for
    pictures, a leak if fed to a model)."""
    return pred * (reference.var(dim=-1, keepdim=True) + eps) ** 0.5 + reference.mean(dim=-1, keepdim=True)


def sliding_window_stats(images: torch.Tensor, window: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel, per-channel mean and (biased) variance [B, C, H, W] over the `window` x `window` neighbourhood.
    An even window has no centre pixel: it spans offsets -window//2 .. window - window//2 - 1 (8: four above/left,
    three below/right). At the border the window keeps only the pixels inside the image. Box filters (avg_pool2d
    with stride 1), not a loop."""
    before, after = window // 2, window - window // 2 - 1
    x = images.float()
    padded = F.pad(torch.cat([x, x * x, torch.ones_like(x[:, :1])], dim=1), (before, after, before, after))
    sums = F.avg_pool2d(padded, window, stride=1) * window * window
    c = x.shape[1]
    count = sums[:, 2 * c:]
    mean = sums[:, :c] / count
    return mean, (sums[:, c:2 * c] / count - mean * mean).clamp(min=0)


def sliding_window_pixels(images: torch.Tensor, window: int = 8, eps: float = 1e-6) -> torch.Tensor:
    """CIM's RESPIX target (Sec. 2.2): every pixel standardised by the statistics of the `window` x `window`
    neighbourhood around it (`sliding_window_stats`); [B, C, H, W] -> [B, C, H, W]."""
    mean, var = sliding_window_stats(images, window)
    return (images.float() - mean) / (var + eps) ** 0.5
