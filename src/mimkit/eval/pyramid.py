"""Feature pyramids over a pre-trained encoder for dense heads (segmentation; detection uses the same).

- `ViTPyramid`: the multi-scale adaptor of BEiT, MAE's and CAE's segmentation and detection code: the patch maps of
  four blocks (e.g. 4/6/8/12 of ViT-B, 1-based) resampled to x4 (two 2x2 deconvolutions with BatchNorm + GELU
  between), x2 (one deconvolution), x1 and x1/2 (2x2 max-pooling) of the patch grid: strides 4/8/16/32 px at
  patch 16. The blocks' outputs are taken before the encoder's final norm, as that code does.
  With the last block four times (`simple_blocks`), the same resampling is ViTDet's simple feature pyramid (Li et
  al. 2022, Fig. 2c) from the last map alone.
- `ResNetPyramid`: a ResNet's four stages (strides 4/8/16/32 px, or dilated to a smaller output stride).

Both read the encoder through timm's `forward_intermediates`, so any timm ViT, Beit or ResNet the exports name fits.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def is_vit(encoder: nn.Module) -> bool:
    return hasattr(encoder, "blocks") and hasattr(encoder, "patch_embed")


class ViTPyramid(nn.Module):
    def __init__(self, encoder: nn.Module, blocks: Sequence[int]):
        super().__init__()
        depth, dim = len(encoder.blocks), encoder.embed_dim
        if len(blocks) != 4 or not all(1 <= b <= depth for b in blocks) or list(blocks) != sorted(blocks):
            raise ValueError(f"the pyramid takes 4 blocks in increasing order from 1 to {depth} (1-based), not {list(blocks)}")
        self.encoder, self.indices = encoder, [b - 1 for b in blocks]
        patch = encoder.patch_embed.patch_size[0]
        self.resample = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2)),
            nn.ConvTranspose2d(dim, dim, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        self.channels, self.strides = [dim] * 4, [patch / 4, patch / 2, patch, patch * 2]
        self.size_multiple = patch * 2          # inputs padded to it, so the max-pooled map is exact

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taken = sorted(set(self.indices))          # timm returns a block once, however often it is named
        maps = self.encoder.forward_intermediates(x, indices=taken, norm=False, output_fmt="NCHW",
                                                  intermediates_only=True)
        by_block = dict(zip(taken, maps))
        return [f(by_block[i]) for f, i in zip(self.resample, self.indices)]


class ResNetPyramid(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        info = encoder.feature_info[-4:]
        self.channels, self.strides = [f["num_chs"] for f in info], [f["reduction"] for f in info]
        self.size_multiple = 32

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)


def build_pyramid(encoder: nn.Module, blocks: Sequence[int] | None) -> nn.Module:
    if is_vit(encoder):
        depth = len(encoder.blocks)
        return ViTPyramid(encoder, blocks or default_blocks(depth))
    return ResNetPyramid(encoder)


def simple_blocks(depth: int) -> list[int]:
    """ViTDet's simple feature pyramid: every scale from the last block."""
    return [depth] * 4


def default_blocks(depth: int) -> list[int]:
    """Blocks 4/6/8/12 of a 12-deep ViT, scaled to other depths (ViT-L: 8/12/16/24, as BEiT's large configs)."""
    return [max(1, round(depth * f)) for f in (1 / 3, 1 / 2, 2 / 3, 1)]
