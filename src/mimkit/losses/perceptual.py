"""Perceptual MAE's losses (shared/papers/003_60891aaf38b668c1.txt, Sec. 3.1): the MS-SSIM + L1 term (Eq. 2), Gram
matrices and the feature / style matching terms of a loss network (Eq. 3), and LS-GAN as Eq. 4-5 write it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 3, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM [B, C, H, W] with a `window` x `window` block (box) filter, the image reflected at the borders
    so every pixel has a full window; C1 = (0.01 L)^2, C2 = (0.03 L)^2 for data range L."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pad = window // 2
    x, y = (F.pad(t.float(), (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    box = lambda t: F.avg_pool2d(t, window, stride=1)                     # noqa: E731
    mu_x, mu_y = box(x), box(y)
    var_x, var_y = box(x * x) - mu_x ** 2, box(y * y) - mu_y ** 2
    cov = box(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def image_pyramid(x: torch.Tensor, scales: int) -> list[torch.Tensor]:
    """`scales` images, each half the size of the one before (2x2 average pooling)."""
    out = [x]
    for _ in range(scales - 1):
        out.append(F.avg_pool2d(out[-1], 2))
    return out


def ms_ssim_l1_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.85, scales: int = 4, window: int = 3,
                    data_range: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 with its L1 partner: (alpha * mean over scales and pixels of (1 - SSIM) / 2,
    (1 - alpha) * mean |pred - target|) on images in [0, data_range]. The paper's 1/N sum over pixel indices is
    read as a mean over pixels and scales (N = 4 scales, 2x2 average pooling between them)."""
    terms = [((1 - ssim_map(p, t, window, data_range)) / 2).mean()
             for p, t in zip(image_pyramid(pred, scales), image_pyramid(target, scales))]
    return alpha * torch.stack(terms).mean(), (1 - alpha) * (pred.float() - target.float()).abs().mean()


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Psi of Eq. 3 (Gatys et al.; Johnson et al.): [B, C, H, W] -> [B, C, C], normalised by C * H * W."""
    b, c, h, w = features.shape
    f = features.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def feature_matching_terms(fake: list[torch.Tensor], real: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                                         list[torch.Tensor]]:
    """Per layer j of the loss network: (1/N_j ||phi_j(G) - phi_j(I)||_1, 1/N_j ||Psi(phi_j(G)) - Psi(phi_j(I))||_1),
    i.e. mean absolute differences of the feature maps and of their Gram matrices (Eq. 3 before delta_f, delta_s)."""
    feature = [(f.float() - r.float()).abs().mean() for f, r in zip(fake, real)]
    style = [(gram_matrix(f) - gram_matrix(r)).abs().mean() for f, r in zip(fake, real)]
    return feature, style


def lsgan_discriminator_loss(real: torch.Tensor, fake: torch.Tensor, half_on_fake: bool = False,
                             square_batch_mean: bool = False) -> torch.Tensor:
    """Eq. 4 as printed: 1/2 (D(I) - 1)^2 + D(G(I_m))^2, means over the batch (and a critic's map). The 1/2 covers the
    real term only, as written; `half_on_fake` halves the fake term too (Mao et al.'s LSGAN). `square_batch_mean`
    squares the batch means instead of averaging squares (the official code's reading)."""
    real, fake = real.float(), fake.float()
    if square_batch_mean:
        real_term, fake_term = (real.mean() - 1) ** 2, fake.mean() ** 2
    else:
        real_term, fake_term = ((real - 1) ** 2).mean(), (fake ** 2).mean()
    return 0.5 * real_term + (0.5 if half_on_fake else 1.0) * fake_term


def lsgan_generator_loss(fake: torch.Tensor, square_batch_mean: bool = False) -> torch.Tensor:
    """Eq. 5: 1/2 (D(G(I_m)) - 1)^2, mean over the batch (or of the batch mean, squared)."""
    fake = fake.float()
    return 0.5 * ((fake.mean() - 1) ** 2 if square_batch_mean else ((fake - 1) ** 2).mean())
