"""GAN losses on discriminator logits, with labels 1 = original (real), 0 = generated (fake).

Three kinds, as the papers use them:
- `nonsaturating` (Goodfellow et al.; ELECTRA-style replaced-token detection, Vision ELECTRA Eq. 2-4,
  GAN-MAE): D minimises binary cross-entropy; G minimises -log D(fake) = softplus(-logit).
- `least_squares` (LSGAN, Mao et al.): D minimises 1/2 (D - 1)^2 on real and 1/2 D^2 on fake;
  G minimises 1/2 (D(fake) - 1)^2. Methods with other weights (Perceptual MAE's Eq. 4) scale the parts.
- `hinge` (Lim & Ye; StyleGAN-family critics): D minimises relu(1 - D) on real and relu(1 + D) on fake;
  G minimises -D(fake).
All return per-element losses with `reduction="none"`, else the (optionally weighted) mean in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_KINDS = ("nonsaturating", "least_squares", "hinge")


def _reduce(loss: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if weight is None:
        return loss.mean()
    weight = weight.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp(min=1)


def discriminator_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "nonsaturating",
                       weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """D's loss on `logits` with per-element `labels` (1 = real, 0 = fake)."""
    x, y = logits.float(), labels.float()
    if kind == "nonsaturating":
        loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    elif kind == "least_squares":
        loss = 0.5 * (y * (x - 1) ** 2 + (1 - y) * x ** 2)
    elif kind == "hinge":
        loss = y * F.relu(1 - x) + (1 - y) * F.relu(1 + x)
    else:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {', '.join(GAN_KINDS)}")
    return _reduce(loss, weight, reduction)


def generator_loss(fake_logits: torch.Tensor, kind: str = "nonsaturating", weight: torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """G's adversarial loss: small when D takes the generated elements for real."""
    x = fake_logits.float()
    if kind == "nonsaturating":
        loss = F.softplus(-x)                              # -log sigmoid(x)
    elif kind == "least_squares":
        loss = 0.5 * (x - 1) ** 2
    elif kind == "hinge":
        loss = -x
    else:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {', '.join(GAN_KINDS)}")
    return _reduce(loss, weight, reduction)
