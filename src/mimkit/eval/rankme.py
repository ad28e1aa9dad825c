"""Label-free signals of representation quality: RankMe and the spread of the features.

RankMe (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", Eq. 1): with sigma_k the singular values of the *uncentred* embedding matrix
Z [N, D] and p_k = sigma_k / ||sigma||_1, RankMe(Z) = exp(-sum_k p_k log p_k), a smooth count of the directions the
features use: between 1 (every image maps to one direction) and min(N, D); invariant to scaling Z. Deviation: the
paper adds eps = 1e-7 to every p_k for numerical safety; here 0 log 0 = 0 instead (torch.special.xlogy), so k equal
non-zero singular values give exactly k (the paper's eps adds ~1.6e-6 of entropy per zero singular value).

Feature spread: the per-dimension standard deviation of the L2-normalised features, averaged over dimensions and
multiplied by sqrt(D), so that features spread evenly over the sphere read about 1 and features that collapse to a
point read 0 (SimSiam, Chen & He 2021, Sec. 4.1, tracks the unscaled std against 1/sqrt(D) for the same purpose).

Collapse warning (`collapse_warning`), on the *centred* features (each image's feature minus the mean feature):
RankMe below 1 % of min(N, D) (at least 2) - the RankMe paper's collapsed runs sit at a few units while working ones
use a sizable share of the dimensions - or a spread below 0.05 (SimSiam's collapsed runs reach a std of ~0, working
ones ~1/sqrt(D), i.e. ~1 here). Centred, because the uncentred RankMe also falls when one mean direction dominates
while the images still differ. Measured on the tiny MAE recipe (1,000 Fashion-MNIST test images, ViT-mini,
D = 128): random init uncentred RankMe 8.1, spread 0.28; around the peak lr (steps 10-50) uncentred RankMe 1.8-2.3
and spread 0.04-0.06, but centred 16-17 and 0.91 (the images differ; the mean dominates); after 500 steps uncentred
24.3 and 0.73. A constant encoder: centred RankMe 1, spread 0. The trainer does not warn during the warm-up either.
"""
from __future__ import annotations

import torch


def rankme(features: torch.Tensor) -> float:
    """RankMe of features [N, D] (uncentred), computed in float64."""
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def feature_spread(features: torch.Tensor) -> float:
    """sqrt(D) x the mean per-dimension std of the L2-normalised features: ~1 spread, 0 collapsed."""
    z = torch.nn.functional.normalize(features.double(), dim=1)
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


def collapse_warning(features: torch.Tensor) -> str | None:
    """One line when the features [N, D] look collapsed (centred; thresholds in the module docstring), else None."""
    centred = features.double() - features.double().mean(0)
    rank, spread = rankme(centred), feature_spread(centred)
    if rank < max(2.0, 0.01 * min(features.shape)) or spread < 0.05:
        return (f"warning: the encoder's features look collapsed (centred RankMe {rank:.1f} of at most "
                f"{min(features.shape)}, spread {spread:.3f}; features that tell images apart use many directions and "
                f"spread ~1): lower the lr, check the loss curve and the reconstructions")
    return None
