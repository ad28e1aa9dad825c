"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022).

Masked patches are replaced by a learnt mask token inside the encoder (ViT or Swin); a one-layer
prediction head (1x1 conv + pixel shuffle) regresses raw pixels; the loss is L1 on masked pixels.
Masks are drawn on a coarse grid of 32-px mask patches at ratio 0.6 (Sec. 3.1, Table 1), ceil(ratio x count)
of them as the official MaskGenerator, and upsampled to the model's patch grid; `mask_patch_size` scales
that down for small images. No weight decay on the mask token, CLS token, position embeddings and relative
position tables (the official `no_weight_decay` lists); the 800-epoch recipes use the multistep schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mimkit import keyed_random as draws
from mimkit.backbones import SwinBackbone, ViTBackbone, build_backbone
from mimkit.config import Config, method_options
from mimkit.losses import masked_l1
from mimkit.masking import simmim_mask
from mimkit.methods.base import Method
from mimkit.patches import mask_to_pixels


@dataclass
class SimMIMOptions:
    mask_ratio: float = 0.6
    mask_patch_size: int = 32          # pixels; 32 at 224 px in the paper
    layer_scale: float | None = 0.1    # ViT only: SimMIM's ViT uses layer scale 0.1


class SimMIM(Method):
    """SimMIM pre-training: `loss_l1` on masked pixels (Xie et al., Eq. 1 with L1, Table 1)."""

    options = SimMIMOptions
    relative_positions = True                  # SimMIM's own ViT: model.position=shared_relative
    # SimMIM's `no_weight_decay` / `no_weight_decay_keywords` (besides biases and norms)
    no_weight_decay_keys = ("mask_token", "cls_token", "pos_embed", "absolute_pos_embed", "relative_position_bias_table")

    def __init__(self, cfg: Config, in_chans: int, opts: SimMIMOptions | None = None):
        super().__init__()
        self.opts = opts or method_options(cfg)
        self.backbone = build_backbone(cfg.model, in_chans, mask_token=True, sincos_pos=False,
                                       init_values=self.opts.layer_scale)
        stride = self.backbone.encoder_stride if isinstance(self.backbone, SwinBackbone) else cfg.model.patch_size
        # named `decoder` as in the official release: Conv2d(D, stride^2 * C, 1) + PixelShuffle(stride)
        self.decoder = nn.Sequential(nn.Conv2d(self.backbone.embed_dim, stride ** 2 * in_chans, kernel_size=1),
                                     nn.PixelShuffle(stride))
        simmim_mask(1, self.backbone.grid, self.opts.mask_ratio, self.opts.mask_patch_size,
                    self.backbone.patch_size, "cpu")  # fail now, with a clear message, on a bad mask size

    @property
    def encoder(self):
        return self.backbone

    def mask(self, images: torch.Tensor) -> torch.Tensor:
        return simmim_mask(images.shape[0], self.backbone.grid, self.opts.mask_ratio, self.opts.mask_patch_size,
                           self.backbone.patch_size, images.device)

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor, latent_noise_std: float = 0.0) -> torch.Tensor:
        """Predicted image [B, C, H, W] (every pixel; the loss reads the masked ones)."""
        z = self.backbone.forward_masked(images, mask)
        if latent_noise_std > 0:  # Vision ELECTRA Sec. 3.2: z + z~, z~ ~ N(0, std^2)
            z = z + draws.randn_like(z) * latent_noise_std
        if isinstance(self.backbone, ViTBackbone):                              # [B, 1+L, D] -> [B, D, gh, gw]
            gh, gw = self.backbone.grid
            z = z[:, self.backbone.num_prefix:].transpose(1, 2).reshape(z.shape[0], -1, gh, gw)
        return self.decoder(z)                                                  # [B, C, H, W]

    def forward(self, images: torch.Tensor, stage: str = "model", carry: dict | None = None) -> dict:
        mask = self.mask(images)
        recon = self.reconstruct(images, mask)
        pixel_mask = mask_to_pixels(mask, self.backbone.patch_size, self.backbone.grid)
        loss = masked_l1(recon, images, pixel_mask)
        return {"loss": loss, "parts": {"loss_l1": loss}}

    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        mask = self.mask(images)
        recon = self.reconstruct(images, mask)
        keep = 1 - mask_to_pixels(mask, self.backbone.patch_size, self.backbone.grid).to(images.dtype)
        return [("original", images), ("masked", images * keep), ("reconstruction", images * keep + recon * (1 - keep))]

    def pretrained_parts(self, state_dict: dict) -> list:
        """Official SimMIM release (`encoder.*`: BEiT-style ViT or original Swin; `decoder.0.*`), a mimkit
        SimMIM run or any mimkit run's encoder. The decoder is optional."""
        from mimkit.pretrained import Part, encoder_state, strip_prefix
        if any(k.startswith("generator.") for k in state_dict):      # Vision ELECTRA run with a SimMIM generator
            state_dict = strip_prefix(state_dict, "generator.")
        decoder = {k: v for k, v in state_dict.items() if k.startswith("decoder.")}
        return [Part("encoder", self.backbone, encoder_state(state_dict, self.backbone)),
                Part("decoder", self, decoder, required=False, prefixes=("decoder.",))]
