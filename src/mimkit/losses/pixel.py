"""Pixel reconstruction losses over masked patches."""
from __future__ import annotations

import math

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


def logit_laplace_nll(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """DALL-E's logit-Laplace reconstruction loss (Ramesh et al. 2021, Appendix A.3), mean over pixel values.

    target: mapped pixels in (0, 1) [B, C, H, W]; output [B, 2C, H, W]: location mu and log-scale ln b of
    logit(x) ~ Laplace(mu, b). -log p(x) = |logit(x) - mu| / b + ln(2b) + ln(x (1 - x)).
    """
    channels = target.shape[1]
    mu, log_b = output[:, :channels].float(), output[:, channels:].float()
    x = target.float()
    nll = (torch.logit(x) - mu).abs() * torch.exp(-log_b) + log_b + math.log(2) + torch.log(x * (1 - x))
    return nll.mean()
