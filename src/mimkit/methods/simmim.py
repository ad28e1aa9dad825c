"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022).

Masked patches are replaced by a learnt mask token inside the encoder (ViT or Swin); a one-layer
prediction head (1x1 conv + pixel shuffle) regresses raw pixels; the loss is L1 on masked pixels.
Masks are drawn on a coarse grid of 32-px mask patches at ratio 0.6 (Sec. 3.1, Table 1) and
upsampled to the model's patch grid; `mask_patch_size` scales that down for small images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from mimkit.backbones import SwinBackbone, ViTBackbone, build_backbone
from mimkit.config import Config, method_options
from mimkit.losses import masked_l1
from mimkit.masking import simmim_mask
from mimkit.methods.base import CheckpointMismatch, Method
from mimkit.patches import mask_to_pixels


@dataclass
class SimMIMOptions:
    mask_ratio: float = 0.6
    mask_patch_size: int = 32          # pixels; 32 at 224 px in the paper
    layer_scale: float | None = 0.1    # ViT only: SimMIM's ViT uses layer scale 0.1


class SimMIM(Method):
    """SimMIM pre-training: `loss_l1` on masked pixels (Xie et al., Eq. 1 with L1, Table 1)."""

    options = SimMIMOptions

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
            z = z + torch.randn_like(z) * latent_noise_std
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

    def convert_checkpoint(self, state_dict: dict) -> dict:
        """Official SimMIM release: `encoder.*` (BEiT-style ViT or original Swin) and `decoder.0.*`."""
        if any(k.startswith("backbone.") for k in state_dict):  # already mimkit's layout
            return state_dict
        out = {k: v for k, v in state_dict.items() if k.startswith("decoder.")}
        encoder = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
        if "mask_token" in encoder:
            out["backbone.mask_token"] = encoder.pop("mask_token").reshape(self.backbone.mask_token.shape)
        if isinstance(self.backbone, SwinBackbone):
            from timm.models.swin_transformer import checkpoint_filter_fn
            encoder = checkpoint_filter_fn(encoder, self.backbone.model)
        else:
            encoder = simmim_vit_to_timm(encoder, self.backbone.grid)
        out.update({f"backbone.model.{k}": v for k, v in encoder.items()})
        return out


def simmim_vit_to_timm(encoder: dict, grid: tuple[int, int]) -> dict:
    """SimMIM's BEiT-style ViT keys -> timm VisionTransformer keys: q/v biases become one qkv bias (the
    k bias is zero), gamma_1/2 become layer-scale gammas, the position embedding is resized to `grid`."""
    out = {}
    for key, value in encoder.items():
        if "relative_position" in key:
            raise CheckpointMismatch("this SimMIM ViT checkpoint uses relative position biases, which mimkit's "
                                     "ViT (timm VisionTransformer, absolute positions) does not have; use a "
                                     "SimMIM Swin checkpoint, or an MAE checkpoint for a ViT")
        if key.endswith("attn.v_bias") or key == "mask_token":
            continue
        if key.endswith("attn.q_bias"):
            v_bias = encoder[key.replace("q_bias", "v_bias")]
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
            continue
        out[key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")] = value
    if "pos_embed" in out and out["pos_embed"].shape[1] != 1 + grid[0] * grid[1]:
        out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], list(grid), num_prefix_tokens=1)
    return out
