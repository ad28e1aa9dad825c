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

from mimkit import keyed_random as draws

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


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """R1 (Mescheder et al. 2018; StyleGAN2's form): gamma / 2 * E_x ||grad_x D(x)||^2 on real images `real`, which
    must require grad and be what `real_logits` were computed from. The gradient is kept in the graph, so the penalty
    trains D."""
    grad, = torch.autograd.grad(real_logits.float().sum(), real, create_graph=True)
    return gamma / 2 * grad.float().square().flatten(1).sum(1).mean()


def path_length_penalty(features: list[torch.Tensor], latent: torch.Tensor, running_mean: torch.Tensor,
                        decay: float = 0.01) -> torch.Tensor:
    """StyleGAN2's path-length regulariser with the critic's feature maps as the output and the decoder's input as
    the latent (Perceptual MAE Sec. 3.2): with y = sum_j <phi_j, n_j> / sqrt(H_j W_j), n_j ~ N(0, I) drawn afresh,
    a_b = sqrt(mean over tokens of sum over channels of (dy / d latent_b)^2) is the length of J_b^T n for image b;
    the penalty is mean_b (a_b - a)^2, with a the running mean of a_b (`running_mean`, updated in place with `decay`,
    StyleGAN2's 0.01). `latent` [B, T, D] must be in the graph of `features`."""
    y = sum((f.float() * draws.randn(f.shape[0], *f.shape[1:], device=f.device)).sum() / (f.shape[-2] * f.shape[-1]) ** 0.5
            for f in features)
    grad, = torch.autograd.grad(y, latent, create_graph=True)
    lengths = grad.float().square().sum(-1).mean(-1).add(1e-8).sqrt()           # [B]
    with torch.no_grad():
        running_mean.lerp_(lengths.mean(), decay)
    return (lengths - running_mean).square().mean()
