"""Targets: what a reconstruction loss compares against (separate from the loss)."""
from __future__ import annotations

import torch

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
