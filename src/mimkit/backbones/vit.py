"""ViT adapter for masked image modeling over timm's VisionTransformer, or timm's Beit for SimMIM's own ViT (a
relative position bias shared by all blocks, no absolute table); never a fork of their blocks."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import timm
import torch
from torch import nn

from mimkit.masking import gather_tokens

# Named ViT sizes: (embed_dim, depth, num_heads, timm name used in exports).
VIT_SIZES = {
    "pico": (64, 4, 4, "vit_tiny_patch16_224"),    # tests
    "mini": (128, 6, 4, "vit_tiny_patch16_224"),   # CPU demo on 28 px
    "tiny": (192, 12, 3, "vit_tiny_patch16_224"),
    "small": (384, 12, 6, "vit_small_patch16_224"),
    "base": (768, 12, 12, "vit_base_patch16_224"),
    "large": (1024, 24, 16, "vit_large_patch16_224"),
}
# model.position: absolute (a learnt or fixed sin-cos table, timm VisionTransformer) | shared_relative (SimMIM's ViT,
# BEiT's blocks with q/v biases and one relative position bias for all blocks: timm Beit)
POSITIONS = ("absolute", "shared_relative")
BEIT_NAME = "beit_base_patch16_224"     # the timm name exports use; the kwargs set width, depth and positions


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool, rows_first: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [1, (1)+gh*gw, dim], laid out as MAE's (first half: x, second: y),
    or with `rows_first` as CAE's official code builds it (first half: y, second: x; its meshgrid order)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    gh, gw = grid
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([encode(ys), encode(xs)] if rows_first else [encode(xs), encode(ys)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class ViTBackbone(nn.Module):
    """timm ViT plus what MIM needs: encode visible tokens only, or replace masked tokens by a mask token.

    `self.model` is a plain timm VisionTransformer, or with `position="shared_relative"` a timm Beit with one shared
    relative position bias (SimMIM's ViT; it encodes every token, so no visible-only encoding); it is the exported
    encoder, and `mask_token` lives beside it.
    """

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, size: str = "base",
                 embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, init_values: float | None = None,
                 sincos_pos: bool = True, mask_token: bool = False, sincos_rows_first: bool = False,
                 position: str = "absolute"):
        super().__init__()
        if size not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {size!r}; choose one of {', '.join(VIT_SIZES)}")
        if position not in POSITIONS:
            raise ValueError(f"unknown model.position {position!r}; choose one of {', '.join(POSITIONS)}")
        d, n, h, timm_name = VIT_SIZES[size]
        self.relative = position == "shared_relative"
        self.timm_name = BEIT_NAME if self.relative else timm_name
        self.timm_kwargs = dict(img_size=list(img_size), patch_size=patch_size, in_chans=in_chans,
                                embed_dim=embed_dim or d, depth=depth or n, num_heads=num_heads or h,
                                mlp_ratio=mlp_ratio, init_values=init_values, num_classes=0, global_pool="token")
        if self.relative:
            self.timm_kwargs.update(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
        self.model = timm.create_model(self.timm_name, pretrained=False, drop_path_rate=drop_path, **self.timm_kwargs)
        self.patch_size = (patch_size, patch_size)
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = self.model.embed_dim
        self.in_chans = in_chans
        self.num_prefix = self.model.num_prefix_tokens  # 1: the CLS token
        if sincos_pos and not self.relative:  # MAE: fixed 2-D sin-cos, not learnt
            self.model.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid, cls_token=True,
                                                                rows_first=sincos_rows_first))
            self.model.pos_embed.requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if mask_token else None
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _run_blocks(self, x: torch.Tensor, return_layers: Sequence[int] | None):
        if self.relative:
            bias = self.model.rel_pos_bias()
            blocks = [lambda t, blk=blk: blk(t, shared_rel_pos_bias=bias) for blk in self.model.blocks]
        else:
            x, blocks = self.model.norm_pre(x), self.model.blocks
        feats = []
        for i, block in enumerate(blocks):
            x = block(x)
            if return_layers is not None and i in return_layers:
                feats.append(x)
        x = self.model.norm(x)
        return (x, feats) if return_layers is not None else x

    def forward_visible(self, images: torch.Tensor, ids_visible: torch.Tensor,
                        return_layers: Sequence[int] | None = None):
        """Encode only the visible patches (MAE). ids_visible [B, K] -> tokens [B, 1+K, D] (CLS first)."""
        if self.relative:
            raise ValueError("a ViT with a shared relative position bias (model.position=shared_relative) encodes every "
                             "token; an encoder of the visible patches only (MAE-style) needs model.position=absolute")
        pos = self.model.pos_embed
        x = self.model.patch_embed(images) + pos[:, self.num_prefix:]   # [B, L, D]
        x = gather_tokens(x, ids_visible)                               # [B, K, D]
        cls = (self.model.cls_token + pos[:, :self.num_prefix]).expand(x.shape[0], -1, -1)
        return self._run_blocks(torch.cat([cls, x], dim=1), return_layers)

    def forward_masked(self, images: torch.Tensor, mask: torch.Tensor | None,
                       return_layers: Sequence[int] | None = None):
        """Encode every patch, masked ones replaced by the mask token (SimMIM). -> [B, 1+L, D]."""
        x = self.model.patch_embed(images)                              # [B, L, D]
        if mask is not None:
            if self.mask_token is None:
                raise RuntimeError("this backbone was built without a mask token")
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        if self.relative:                                               # SimMIM's ViT: CLS, no absolute table
            x = self.model.pos_drop(torch.cat([self.model.cls_token.expand(x.shape[0], -1, -1), x], dim=1))
        else:
            x = self.model._pos_embed(x)
        return self._run_blocks(x, return_layers)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens of the unmasked image [B, 1+L, D], exactly as the exported timm model computes them."""
        return self.model.forward_features(images)


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix: int = 1) -> torch.Tensor:
    """[B, P+L, D] token sequence -> [B, D] by CLS token or mean of patch tokens."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, num_prefix:].mean(dim=1)
    raise ValueError(f"unknown pooling {pool!r}; use 'cls' or 'mean'")
