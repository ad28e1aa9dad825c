"""ResNet adapter over timm's ResNet (CIM's CNN enhancer): the exported encoder is the plain timm model.

timm's `resnet50` is torchvision's ResNet-50 layer for layer (stride on the 3x3 conv), which is what CIM pre-trains
(Appendix A.3: "the torchvision ResNet-50 without any architectural change"). The init differs by one switch: timm
zero-initialises the last BatchNorm of each block, torchvision (zero_init_residual=False) does not; mimkit follows
torchvision, as the paper names it (`model.zero_init_last=true` for timm's). `mini` is a CPU-sized ResNet (basic blocks, one per stage, widths 32-256) for the Fashion-MNIST recipes.
`output_stride` 8 or 16 dilates the last stages instead of striding them (timm's option), so a small input keeps a
feature map big enough to map onto a token grid.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

# Named ResNet sizes: (timm name, extra timm kwargs).
RESNET_SIZES = {
    "mini": ("resnet18", dict(layers=[1, 1, 1, 1], channels=[32, 64, 128, 256], stem_width=32)),
    "18": ("resnet18", {}),
    "34": ("resnet34", {}),
    "50": ("resnet50", {}),
    "101": ("resnet101", {}),
}


class ResNetBackbone(nn.Module):
    """timm ResNet; `forward_features` returns the last stage's map [B, D, H / output_stride, W / output_stride]."""

    num_prefix = 0

    def __init__(self, img_size: tuple[int, int], in_chans: int, size: str = "50", output_stride: int = 32,
                 drop_path: float = 0.0, zero_init_last: bool = False, **unused):
        super().__init__()
        if size not in RESNET_SIZES:
            raise ValueError(f"unknown ResNet size {size!r}; choose one of {', '.join(RESNET_SIZES)}")
        timm_name, extra = RESNET_SIZES[size]
        self.timm_name = timm_name
        self.timm_kwargs = dict(extra, in_chans=in_chans, num_classes=0, output_stride=output_stride)
        self.model = timm.create_model(timm_name, pretrained=False, drop_path_rate=drop_path,
                                       zero_init_last=zero_init_last, **self.timm_kwargs)   # init only: not exported
        self.in_chans = in_chans
        self.embed_dim = self.model.num_features
        self.stride = output_stride
        self.grid = tuple(-(-s // output_stride) for s in img_size)   # the feature map's size (ceil, as the convs pad)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)
