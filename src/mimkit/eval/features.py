"""Frozen-feature extraction shared by the probes: any timm encoder, or raw pixels as a baseline."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from mimkit.backbones import pool_tokens
from mimkit.data import Augmented, EvalTransform, to_unit_float


def embed(model: torch.nn.Module, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """[B, C, H, W] -> [B, D]: ViT tokens pooled by CLS or patch mean; Swin/CNN maps averaged;
    pool='tokens' keeps a ViT's patch tokens [B, L, D] (attentive probing)."""
    feats = model.forward_features(images)
    if pool == "tokens":
        if feats.ndim != 3:
            raise ValueError("attentive probing needs a ViT encoder (patch tokens), not a feature map")
        return feats[:, getattr(model, "num_prefix_tokens", 1):]
    if feats.ndim == 3:                                  # ViT tokens [B, P+L, D]
        return pool_tokens(feats, pool, getattr(model, "num_prefix_tokens", 1))
    if feats.ndim == 4 and feats.shape[-1] == getattr(model, "num_features", -1):
        return feats.mean(dim=(1, 2))                    # Swin NHWC
    return feats.mean(dim=(2, 3))                        # CNN NCHW


def subset(dataset, limit: int | None, seed: int = 0):
    if not limit or limit >= len(dataset):
        return dataset
    gen = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=gen)[:limit].tolist())


def labels_of(dataset) -> torch.Tensor:
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.tensor(dataset.indices)]
    labels = getattr(dataset, "labels")
    return labels.clone() if torch.is_tensor(labels) else torch.tensor(labels)


@torch.no_grad()
def extract_features(model: torch.nn.Module | None, dataset, img_size, mean, std, pool: str = "cls",
                     batch_size: int = 256, device: str | torch.device = "cpu", num_workers: int = 0):
    """(features [N, D] float32 on CPU, labels [N]); `model=None` gives normalised raw pixels;
    pool='tokens' gives patch tokens [N, L, D]."""
    device = torch.device(device)
    loader = DataLoader(Augmented(dataset, EvalTransform(img_size)), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    if model is not None:
        model.eval().to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    feats, labels = [], []
    bar = tqdm(total=len(dataset), unit="img", desc="embedding", disable=None, leave=False)   # a terminal only
    for images, y, _ in loader:
        bar.update(len(y))
        x = images.to(device)
        x = to_unit_float(x)
        x = (x - mean_t) / std_t
        with autocast:
            f = x.flatten(1) if model is None else embed(model, x, pool)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    bar.close()
    return torch.cat(feats), torch.cat(labels)
