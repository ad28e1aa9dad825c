"""Convolutional critics on the full image, with their intermediate feature maps exposed as a loss network (Perceptual
MAE, shared/papers/003_60891aaf38b668c1.txt, Sec. 3.1: D is both the adversary and phi of Eq. 3).

- `dcgan` (default): a DCGAN-style stack as the official code's critic (strided convs; BatchNorm and LeakyReLU 0.2
  after every conv but the first; a last conv to one channel, then a linear layer over that map to one logit per
  image). The paper gives no architecture; the official critic is the one its numbers come from, so it is the
  default. Its fixed 224 px layer sizes are generalised: `depth` stride-2 4x4 convs (widths 64, 128, 256, 512, ...)
  for any image size and channel count.
- `patchgan`: pix2pix's PatchGAN (the same stride-2 4x4 blocks, then a stride-1 block and a 4x4 conv to a map of
  per-patch logits, averaged by the loss); an option because it judges local texture, which Eq. 3's style term
  already covers at image level.
The features phi_j are the activations after each block (after its LeakyReLU), the final logit layer excluded.
"""
from __future__ import annotations

import torch
from torch import nn

CRITICS = ("dcgan", "patchgan")


def _block(cin: int, cout: int, stride: int, norm: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 4, stride, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class ConvCritic(nn.Module):
    """forward(images) -> (logits: [B] for dcgan, [B, h, w] for patchgan; features: list of [B, C_j, H_j, W_j])."""

    def __init__(self, in_chans: int, img_size: tuple[int, int], kind: str = "dcgan", width: int = 64, depth: int = 4,
                 max_width: int = 512):
        super().__init__()
        if kind not in CRITICS:
            raise ValueError(f"unknown critic {kind!r}; choose one of {', '.join(CRITICS)}")
        widths = [min(width * 2 ** i, max_width) for i in range(depth)]
        blocks, cin = [], in_chans
        for i, cout in enumerate(widths):
            blocks.append(_block(cin, cout, 2, norm=i > 0))
            cin = cout
        if kind == "patchgan":
            blocks.append(_block(cin, min(cin * 2, max_width), 1, norm=True))
            cin = min(cin * 2, max_width)
        self.blocks = nn.ModuleList(blocks)
        self.kind = kind
        if kind == "dcgan":
            self.to_map = nn.Conv2d(cin, 1, 3, 1, 1, bias=False)
            with torch.no_grad():
                h, w = self._map_size(in_chans, img_size)
            self.final = nn.Linear(h * w, 1)
        else:
            self.to_map = nn.Conv2d(cin, 1, 4, 1, 1)
        for m in self.modules():        # DCGAN's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def _map_size(self, in_chans: int, img_size) -> tuple[int, int]:
        x = torch.zeros(1, in_chans, *img_size)
        for block in self.blocks:
            x = block[0](x)
        if min(x.shape[-2:]) < 1:
            raise ValueError(f"images of {list(img_size)} px are too small for a critic of {len(self.blocks)} "
                             f"stride-2 blocks; lower method.critic_depth")
        return tuple(x.shape[-2:])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features, x = [], images
        for block in self.blocks:
            x = block(x)
            features.append(x)
        logits = self.to_map(x)
        if self.kind == "dcgan":
            return self.final(logits.flatten(1)).squeeze(-1), features
        return logits.squeeze(1), features
