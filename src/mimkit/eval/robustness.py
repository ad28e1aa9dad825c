"""Robustness (GAN-MAE Table 2, in the spirit of ImageNet-C): accuracy under common corruptions at five
severities, applied on the fly to the test split, and corruption errors relative to a baseline run:
CE_c = sum_s err(c, s) / sum_s err_baseline(c, s); mCE = mean over corruptions (Hendrycks & Dietterich 2019).

Corruptions act on images in [0, 1] of any channel count; families: noise (gaussian, shot), blur (gaussian),
weather-like (fog: smooth random haze; brightness), digital (contrast, pixelate, JPEG)."""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F

from mimkit.data import to_unit_float

NOISE_STD = (0.04, 0.08, 0.12, 0.18, 0.26)
SHOT_PHOTONS = (60, 25, 12, 5, 3)
BLUR_SIGMA = (0.5, 0.8, 1.1, 1.5, 2.0)
FOG_STRENGTH = (0.2, 0.3, 0.4, 0.55, 0.7)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTRAST = (0.6, 0.45, 0.3, 0.2, 0.12)
PIXELATE = (0.8, 0.65, 0.5, 0.4, 0.3)
JPEG_QUALITY = (40, 25, 15, 10, 6)


def gaussian_noise(x, s, gen):
    return x + torch.randn(x.shape, generator=gen) * NOISE_STD[s - 1]


def shot_noise(x, s, gen):
    lam = SHOT_PHOTONS[s - 1]
    return torch.poisson(x.clamp(0, 1) * lam, generator=gen) / lam


def gaussian_blur(x, s, gen):
    sigma = BLUR_SIGMA[s - 1]
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def fog(x, s, gen):
    b, _, h, w = x.shape
    haze = F.interpolate(torch.rand(b, 1, max(2, h // 8), max(2, w // 8), generator=gen), size=(h, w),
                         mode="bicubic", align_corners=False).clamp(0, 1)
    a = FOG_STRENGTH[s - 1]
    return x * (1 - a) + haze * a + a * 0.3


def brightness(x, s, gen):
    return x + BRIGHTNESS[s - 1]


def contrast(x, s, gen):
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * CONTRAST[s - 1] + m


def pixelate(x, s, gen):
    h, w = x.shape[-2:]
    small = (max(1, int(h * PIXELATE[s - 1])), max(1, int(w * PIXELATE[s - 1])))
    return F.interpolate(F.interpolate(x, size=small, mode="area"), size=(h, w), mode="nearest")


def jpeg(x, s, gen):
    from PIL import Image
    import numpy as np
    out = torch.empty_like(x)
    for i, img in enumerate((x.clamp(0, 1) * 255).round().to(torch.uint8)):
        for c in range(img.shape[0]):  # channel by channel: works for any channel count
            buf = io.BytesIO()
            Image.fromarray(img[c].numpy()).save(buf, format="JPEG", quality=JPEG_QUALITY[s - 1])
            out[i, c] = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255)
    return out


CORRUPTIONS = {"gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "gaussian_blur": gaussian_blur,
               "fog": fog, "brightness": brightness, "contrast": contrast, "pixelate": pixelate, "jpeg": jpeg}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """uint8 or [0, 1] float images [B, C, H, W] -> corrupted float images in [0, 1]."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, not {severity}")
    x = to_unit_float(images)
    return CORRUPTIONS[name](x, severity, torch.Generator().manual_seed(seed)).clamp(0, 1)


def corruption_accuracy(classify, dataset, img_size, mean, std, corruptions=None, severities=(1, 2, 3, 4, 5),
                        device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """{'clean': top-1, corruption: [top-1 per severity]} for `classify(normalised images) -> logits`."""
    from mimkit.eval.finetune import evaluate
    device = torch.device(device)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    table = {"clean": evaluate(classify, dataset, img_size, mean_t, std_t, device)}
    for name in corruptions or list(CORRUPTIONS):
        table[name] = [evaluate(classify, dataset, img_size, mean_t, std_t, device,
                                transform=lambda x, n=name, s=s: corrupt(x, n, s, seed)) for s in severities]
    return table


def corruption_errors(table: dict, baseline: dict) -> dict:
    """CE per corruption (relative to the baseline's errors) and their mean, mCE."""
    out = {}
    for name, accs in table.items():
        if name == "clean":
            continue
        err = sum(100 - a for a in accs)
        base = sum(100 - a for a in baseline[name])
        out[name] = err / max(base, 1e-9)
    out["mCE"] = sum(out.values()) / max(len(out), 1)
    return out
