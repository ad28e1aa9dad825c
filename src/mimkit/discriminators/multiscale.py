"""Multi-scale critics for Perceptual MAE's MSG-GAN-P and StyleGANv2-ADA-P (shared/papers/003_60891aaf38b668c1.txt,
Sec. 3.2): the critic reads an image pyramid, full scale first, and at every lower scale joins the image of that
scale to its own features (MSG-GAN, Karnewar & Wang, Sec. 3: the discriminator's "combine" function).

- Input: S images, image k of size H / 2^k x W / 2^k (k = 0 .. S-1). Scale 0 goes through a 1x1 "from RGB" conv;
  block k (k = 0 .. S-2) halves the resolution; its output is combined with image k+1; after the last block, the
  epilogue (minibatch standard deviation, 3x3 conv, a conv over the whole remaining map, 1x1 conv) gives one logit
  per image, as MSG-GAN / ProGAN's final block (their 4x4 conv over a 4x4 map; here over whatever size is left).
- `combine`: `lin_cat` (default; MSG-GAN's phi_lin_cat and the official Perceptual MAE critic): a 1x1 conv (no
  activation, as MSG-GAN's r') maps the image to as many channels as the features, then concatenation; `simple` (phi_simple): the raw image channels
  concatenated.
- `block`: `msg` (MSG-GAN / ProGAN: 3x3 conv, 3x3 conv, 2x2 average pooling, LeakyReLU 0.2) or `residual`
  (StyleGAN2's residual discriminator block: the same main path plus a pooled 1x1 skip, summed and scaled by
  1/sqrt(2)). StyleGAN2's equalised learning rate and [1, 3, 3, 1] blur before downsampling are not used (plain
  init, 2x2 average pooling): the paper names neither and plain layers keep the critic a standard module.
- Widths: `width` channels at full scale, doubling per scale up to `max_width` (the official critic: 512 at the
  coarse end).
- Minibatch standard deviation (ProGAN; StyleGAN2's group form): the std over groups of `mbstd_group` images
  (StyleGAN2: 4; the group shrinks to a divisor of the batch), averaged over channels and pixels, appended as one
  constant feature map before the epilogue.
The features phi_j (Perceptual MAE Eq. 3) are the outputs of the S-1 blocks and of the epilogue's 3x3 conv.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS = ("msg", "residual")
COMBINES = ("lin_cat", "simple")


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """[B, C, H, W] -> [B, C+1, H, W]: the mean over channels and pixels of the std over each group of images."""
    b, c, h, w = x.shape
    g = math.gcd(b, group)
    y = x.float().reshape(g, b // g, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))     # [B/g]
    y = y.to(x.dtype).reshape(1, b // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, y], dim=1)


class CriticBlock(nn.Module):
    """3x3 conv, 3x3 conv, 2x2 average pooling (LeakyReLU 0.2); `residual` adds StyleGAN2's pooled 1x1 skip."""

    def __init__(self, cin: int, cout: int, residual: bool):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cin, 3, 1, 1), nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2), 2)
        if self.skip is None:
            return y
        return (y + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


class MultiScaleCritic(nn.Module):
    """forward(pyramid: list of S tensors [B, C, H / 2^k, W / 2^k], full scale first) ->
    (logits [B], features: list of S maps)."""

    def __init__(self, in_chans: int, img_size: tuple[int, int], scales: int, width: int = 64, max_width: int = 512,
                 block: str = "msg", combine: str = "lin_cat", mbstd_group: int = 4):
        super().__init__()
        if block not in BLOCKS or combine not in COMBINES:
            raise ValueError(f"unknown critic block {block!r} or combine {combine!r}; choose from {BLOCKS} and {COMBINES}")
        h, w = img_size
        if scales < 2 or h % 2 ** (scales - 1) or w % 2 ** (scales - 1):
            raise ValueError(f"images of {h}x{w} px cannot make {scales} scales (each halving the last); they must be "
                             f"divisible by 2^(scales-1) = {2 ** (scales - 1)}")
        self.scales, self.img_size, self.combine, self.mbstd_group = scales, (h, w), combine, mbstd_group
        widths = [min(width * 2 ** k, max_width) for k in range(scales)]
        self.from_rgb = nn.ModuleList([nn.Conv2d(in_chans, widths[0], 1)])
        self.blocks = nn.ModuleList()
        for k in range(scales - 1):
            cin = widths[k] if k == 0 else widths[k] + (widths[k] if combine == "lin_cat" else in_chans)
            self.blocks.append(CriticBlock(cin, widths[k + 1], residual=block == "residual"))
            if combine == "lin_cat":
                self.from_rgb.append(nn.Conv2d(in_chans, widths[k + 1], 1))
        last = widths[-1] + (widths[-1] if combine == "lin_cat" else in_chans)
        self.epilogue_conv = nn.Conv2d(last + 1, widths[-1], 3, 1, 1)
        self.epilogue_dense = nn.Conv2d(widths[-1], widths[-1], (h // 2 ** (scales - 1), w // 2 ** (scales - 1)))
        self.to_logit = nn.Conv2d(widths[-1], 1, 1)

    def pyramid_shapes(self) -> list[tuple[int, int]]:
        return [(self.img_size[0] // 2 ** k, self.img_size[1] // 2 ** k) for k in range(self.scales)]

    def forward(self, pyramid: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(pyramid) != self.scales:
            raise ValueError(f"the critic takes {self.scales} scales, got {len(pyramid)}")
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        x, features = self.from_rgb[0](pyramid[0]), []
        for k, block in enumerate(self.blocks):
            x = block(x)
            features.append(x)
            image = pyramid[k + 1]
            x = torch.cat([x, self.from_rgb[k + 1](image) if self.combine == "lin_cat" else image.to(x.dtype)], 1)
        x = act(self.epilogue_conv(minibatch_stddev(x, self.mbstd_group)))
        features.append(x)
        return self.to_logit(act(self.epilogue_dense(x))).flatten(), features
