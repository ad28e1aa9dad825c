"""Pixel reconstruction losses over masked patches."""
from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: per-patch mean squared error [B, L], averaged over masked patches only."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: L1 over masked pixels, divided by the masked pixel count and the channel count.

    pred/target [B, C, H, W]; pixel_mask [B, 1, H, W] with 1 = masked.
    """
    per_pixel = (pred.float() - target.float()).abs()
    channels = pred.shape[1]
    return (per_pixel * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / channels
