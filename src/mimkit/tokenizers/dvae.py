"""DALL-E's discrete VAE (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", Sec. 2.1, Appendix A),
re-implemented so that mimkit can train it on any images and load OpenAI's released weights (`dalle.py`).

Encoder: 7x7 conv in; `groups` groups of `blocks_per_group` residual blocks of widths n_hid x 1, 2, 4, 8, ...,
max-pool 2 after every group but the last; ReLU + 1x1 conv to `vocab_size` logits. Decoder: 1x1 conv in from the
one-hot codes to `n_init`; groups of widths ... 4, 2, 1 x n_hid, nearest up-sampling 2 after every group but the
last; ReLU + 1x1 conv to 2 x C channels (logit-Laplace location and log-scale). Residual branch: ReLU-conv x 4 with
hidden width out/4 (encoder kernels 3,3,3,1; decoder 1,3,3,3), scaled by 1 / (groups x blocks_per_group)^2.
With the released sizes (groups 4, 2 blocks, n_hid 256, n_init 128, vocab 8192) the parameter names map one to
one onto `dall_e`'s (`w`/`b` -> `weight`/`bias`).

Pixels: inputs in [0, 1] are mapped to [eps, 1 - eps] (`map_pixels`, eps = 0.1) before the encoder; the decoded
image is sigmoid(first C output channels) mapped back (`unmap_pixels`): part of the tokenizer, not of the caller.
Differences from the `dall_e` package: any number of groups (3 gives the tiny down-sampling-4 tokenizer), any
vocabulary size, float32 convs under the engine's autocast instead of the package's own float16 switch.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.tokenizers.base import Tokenizer

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], so the logit-Laplace likelihood stays finite at 0 and 1 (DALL-E Sec. A.3)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * kernel ** 2))    # DALL-E's init
    nn.init.zeros_(conv.bias)
    return conv


class ResidualBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, hidden, hidden, hidden, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def conv_encoder(in_chans: int, out_dim: int, n_hid: int, groups: int, blocks_per_group: int) -> nn.Sequential:
    """DALL-E's encoder tower: 7x7 conv, groups of residual blocks (widths 1, 2, 4, ... x n_hid) with max-pool 2
    between groups, ReLU + 1x1 conv to `out_dim` (code logits for the dVAE, latent vectors for VQ)."""
    n_layers = groups * blocks_per_group
    layers, prev = [("input", _conv(in_chans, n_hid, 7))], n_hid
    for g in range(groups):
        width = n_hid * 2 ** g
        group = [(f"block_{i + 1}", ResidualBlock(prev if i == 0 else width, width, n_layers, (3, 3, 3, 1)))
                 for i in range(blocks_per_group)]
        prev = width
        if g < groups - 1:
            group.append(("pool", nn.MaxPool2d(kernel_size=2)))
        layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
    layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _conv(prev, out_dim, 1))]))))
    return nn.Sequential(OrderedDict(layers))


def conv_decoder(in_dim: int, out_chans: int, n_hid: int, n_init: int, groups: int, blocks_per_group: int) -> nn.Sequential:
    """DALL-E's decoder tower: 1x1 conv in to `n_init`, groups of widths ..., 2, 1 x n_hid with nearest up-sampling
    2 between groups, ReLU + 1x1 conv to `out_chans`."""
    n_layers = groups * blocks_per_group
    layers, prev = [("input", _conv(in_dim, n_init, 1))], n_init
    for g in range(groups):
        width = n_hid * 2 ** (groups - 1 - g)
        group = [(f"block_{i + 1}", ResidualBlock(prev if i == 0 else width, width, n_layers, (1, 3, 3, 3)))
                 for i in range(blocks_per_group)]
        prev = width
        if g < groups - 1:
            group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
        layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
    layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _conv(prev, out_chans, 1))]))))
    return nn.Sequential(OrderedDict(layers))


def encoder_features(encoder: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every group of a `conv_encoder` (one map per resolution)."""
    maps = []
    for name, layer in encoder.named_children():
        x = layer(x)
        if name.startswith("group_"):
            maps.append(x)
    return maps


class DiscreteVAE(Tokenizer):
    """DALL-E's dVAE: `logits` (encoder), `decoder_output` (one-hot or relaxed codes -> logit-Laplace parameters)."""

    kind = "dvae"

    def __init__(self, in_chans: int = 3, vocab_size: int = 8192, n_hid: int = 256, n_init: int = 128,
                 groups: int = 4, blocks_per_group: int = 2, img_size: list | None = None):
        super().__init__()
        if n_hid % 4 or n_hid < 4 or groups < 1 or blocks_per_group < 1 or vocab_size < 2:
            raise ValueError("dVAE sizes: n_hid a positive multiple of 4, groups and blocks_per_group >= 1, vocab >= 2")
        self.arch = dict(in_chans=in_chans, vocab_size=vocab_size, n_hid=n_hid, n_init=n_init, groups=groups,
                         blocks_per_group=blocks_per_group, img_size=img_size)
        self.in_chans, self.vocab_size, self.downsample, self.img_size = in_chans, vocab_size, 2 ** (groups - 1), img_size
        self.encoder = conv_encoder(in_chans, vocab_size, n_hid, groups, blocks_per_group)
        self.decoder = conv_decoder(vocab_size, 2 * in_chans, n_hid, n_init, groups, blocks_per_group)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(map_pixels(images.float()))

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return encoder_features(self.encoder, map_pixels(images.float()))

    def decoder_output(self, codes: torch.Tensor) -> torch.Tensor:
        """One-hot (or relaxed) codes [B, V, h, w] -> [B, 2C, H, W]: logit-Laplace location and log-scale."""
        return self.decoder(codes)

    @staticmethod
    def image_from_output(output: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [0, 1]: sigmoid of the location channels, un-mapped."""
        return unmap_pixels(torch.sigmoid(output[:, : output.shape[1] // 2]))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        codes = F.one_hot(ids, self.vocab_size).permute(0, 3, 1, 2).float()
        return self.image_from_output(self.decoder_output(codes))
