"""Swin adapter for SimMIM over timm's SwinTransformer: a mask token right after the patch embedding."""
from __future__ import annotations

import timm
import torch
from torch import nn

# Named Swin sizes: (embed_dim, depths, num_heads, timm name used in exports).
SWIN_SIZES = {
    "pico": (32, (2, 2), (2, 4), "swin_tiny_patch4_window7_224"),
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), "swin_tiny_patch4_window7_224"),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), "swin_small_patch4_window7_224"),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), "swin_base_patch4_window7_224"),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48), "swin_large_patch4_window7_224"),
}


class SwinBackbone(nn.Module):
    """timm Swin plus a mask token; `forward_masked` returns the last stage's map [B, D, h, w]."""

    num_prefix = 0

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, size: str = "base",
                 window_size: int = 7, drop_path: float = 0.0, mask_token: bool = True, **unused):
        super().__init__()
        if size not in SWIN_SIZES:
            raise ValueError(f"unknown Swin size {size!r}; choose one of {', '.join(SWIN_SIZES)}")
        dim, depths, heads, timm_name = SWIN_SIZES[size]
        self.timm_name = timm_name
        self.timm_kwargs = dict(img_size=list(img_size), patch_size=patch_size, in_chans=in_chans, embed_dim=dim,
                                depths=list(depths), num_heads=list(heads), window_size=window_size, num_classes=0)
        self.model = timm.create_model(timm_name, pretrained=False, drop_path_rate=drop_path, **self.timm_kwargs)
        self.patch_size = (patch_size, patch_size)
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.in_chans = in_chans
        self.embed_dim = self.model.num_features
        self.encoder_stride = patch_size * 2 ** (len(depths) - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim)) if mask_token else None
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward_masked(self, images: torch.Tensor, mask: torch.Tensor | None, return_layers=None) -> torch.Tensor:
        x = self.model.patch_embed(images)                              # [B, gh, gw, C] (NHWC)
        if mask is not None:
            w = mask.reshape(x.shape[0], self.grid[0], self.grid[1], 1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = self.model.norm(self.model.layers(x))                       # [B, h, w, D]
        return x.permute(0, 3, 1, 2)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)                      # [B, h, w, D]

