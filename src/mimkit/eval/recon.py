"""Reconstruction quality (Perceptual MAE, Table 1): L1, PSNR, SSIM, MS-SSIM (torchmetrics), and FID / Inception
Score from a feature network loaded from a local file, over a fixed, seeded set of masks so that runs compare."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from mimkit.data import Augmented, EvalTransform, to_unit_float

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


class EncoderFeatures(nn.Module):
    """A timm encoder as an FID feature network: images in [0, 1] -> pooled features [N, D]; images of another size
    than the encoder's are resized to it (bilinear, antialiased), as Inception resizes to 299 px."""

    def __init__(self, encoder: nn.Module, mean, std, pool: str = "mean"):
        super().__init__()
        from mimkit.eval.features import embed
        self.encoder, self.pool, self._embed = encoder.eval(), pool, embed
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.num_features = encoder.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(getattr(getattr(self.encoder, "patch_embed", None), "img_size", None) or images.shape[-2:])
        if tuple(images.shape[-2:]) != size:    # e.g. SimMIM's 32 px runs measured with a 28 px encoder
            images = nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True,
                                               align_corners=False)
        return self._embed(self.encoder, (images.float() - self.mean) / self.std, self.pool).float()


def ms_ssim_settings(height: int, width: int) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights that fit the image: torchmetrics needs min side > (k - 1) * 2^(scales - 1).
    At 224 px: 11 and the usual 5 scales; small images keep fewer scales (weights renormalised)."""
    side = min(height, width)
    for kernel in (11, 7, 3):
        for scales in range(5, 1, -1):
            if side > (kernel - 1) * 2 ** (scales - 1):
                betas = MS_SSIM_BETAS[:scales]
                return kernel, tuple(b / sum(betas) for b in betas)
    raise ValueError(f"images of {height}x{width} are too small for MS-SSIM")


@torch.no_grad()
def reconstruction_metrics(method, dataset, img_size, mean, std, num_images: int = 1000, batch_size: int = 100,
                           mask_seed: int = 0, device: str | torch.device = "cpu",
                           inception_weights: str | None = None, fid_encoder: nn.Module | None = None,
                           fid_encoder_name: str = "") -> dict:
    from torchmetrics.image import (MultiScaleStructuralSimilarityIndexMeasure, PeakSignalNoiseRatio,
                                    StructuralSimilarityIndexMeasure)
    device = torch.device(device)
    method.eval().to(device)
    subset = Subset(dataset, list(range(min(num_images, len(dataset)))))
    loader = DataLoader(Augmented(subset, EvalTransform(img_size)), batch_size=batch_size, shuffle=False)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    kernel, betas = ms_ssim_settings(*img_size)
    psnr = PeakSignalNoiseRatio(data_range=1.0).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    ms_ssim = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=kernel, betas=betas).to(device)
    fid, inception, feature_net = _distribution_metrics(inception_weights, fid_encoder, fid_encoder_name, device)
    l1_sum, count = 0.0, 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(mask_seed)                     # the same masks for every run
        for images, _, _ in loader:
            x = images.to(device)
            x = to_unit_float(x)
            rows = dict(method.reconstruction_rows((x - mean_t) / std_t))
            if "reconstruction" not in rows:      # CIM: corrupted samples and an enhancer output, no reconstruction
                return {"l1": None, "psnr": None, "ssim": None, "ms_ssim": None, "fid": None, "inception_score": None,
                        "num_images": 0, "feature_network": feature_net,
                        "not_measured": f"the method makes no reconstruction of the masked image (its picture rows: "
                                        f"{', '.join(rows)})"}
            recon = (rows["reconstruction"].float() * std_t + mean_t).clamp(0, 1)
            x = x.clamp(0, 1)
            l1_sum += (recon - x).abs().mean(dim=(1, 2, 3)).sum().item()
            count += len(x)
            psnr.update(recon, x)
            ssim.update(recon, x)
            ms_ssim.update(recon, x)
            if fid is not None:
                fid.update(_three_channels(x, inception), real=True)
                fid.update(_three_channels(recon, inception), real=False)
            if inception is not None:
                inception.update(_three_channels(recon, True))
    out = {"l1": l1_sum / count, "psnr": psnr.compute().item(), "ssim": ssim.compute().item(),
           "ms_ssim": ms_ssim.compute().item(), "ms_ssim_scales": len(betas), "num_images": count,
           "mask_seed": mask_seed, "fid": fid.compute().item() if fid is not None else None,
           "inception_score": inception.compute()[0].item() if inception is not None else None,
           "feature_network": feature_net}
    return out


def fid_feature_network(export_path: str | None) -> nn.Module | None:
    """A timm encoder export as the FID feature network (None without a path)."""
    if not export_path:
        return None
    from mimkit.export import export_metadata, load_encoder
    meta = export_metadata(export_path)
    return EncoderFeatures(load_encoder(export_path), meta["mean"], meta["std"], meta.get("pool", "mean"))


def _three_channels(x: torch.Tensor, needed: bool) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if needed and x.shape[1] == 1 else x


def _distribution_metrics(inception_weights, fid_encoder, fid_encoder_name, device):
    """(FID metric or None, Inception Score metric or None, description of the feature network)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    if inception_weights:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.image.inception import InceptionScore
        fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=inception_weights)
        logits = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=inception_weights)
        score = InceptionScore(feature=logits, normalize=True)
        return fid.to(device), score.to(device), f"Inception-v3 ({inception_weights})"
    if fid_encoder is not None:
        fid = FrechetInceptionDistance(feature=fid_encoder, normalize=True)
        return fid.to(device), None, f"timm encoder {fid_encoder_name} (not Inception: FID values are not comparable to published ones; no Inception Score)"
    return None, None, "none (pass --inception-weights or --fid-encoder for FID)"
