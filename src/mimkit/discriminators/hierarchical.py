"""Vision ELECTRA's hierarchical discriminator (Sec. 3.1, 3.3): one ViT backbone over every token of the
image (no masking) with a CLS token, a CNN patch head over the token grid (micro level, one logit per
patch) and a linear image head on the CLS token (macro level)."""
from __future__ import annotations

import torch
from torch import nn

from mimkit.backbones import ViTBackbone


class CNNPatchHead(nn.Module):
    """Patch tokens [B, L, D] on their grid -> one logit per patch [B, L].

    The paper only says "CNN-based"; mimkit's choice: 3x3 conv (D -> hidden) + GELU + 1x1 conv (hidden -> 1),
    so each patch's verdict also sees its 8 neighbours."""

    def __init__(self, dim: int, grid: tuple[int, int], hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.grid = grid
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, *self.grid)                 # [B, D, gh, gw]
        return self.net(x).flatten(1)                                         # [B, L]


class HierarchicalDiscriminator(nn.Module):
    """forward(images) -> (patch logits [B, L], image logits [B]); logit > 0 means "original"."""

    def __init__(self, backbone: ViTBackbone, patch_head_hidden: int | None = None):
        super().__init__()
        if not isinstance(backbone, ViTBackbone):
            raise ValueError("the hierarchical discriminator needs model.arch=vit (a CLS token and one token per patch)")
        self.backbone = backbone
        self.patch_head = CNNPatchHead(backbone.embed_dim, backbone.grid, patch_head_hidden)
        self.image_head = nn.Linear(backbone.embed_dim, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone.forward_features(images)                       # [B, 1+L, D]
        patch_logits = self.patch_head(tokens[:, self.backbone.num_prefix:])  # micro level
        image_logits = self.image_head(tokens[:, 0]).squeeze(-1)              # macro level (CLS)
        return patch_logits, image_logits
