"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022).

The encoder sees only the visible 25 % of patches; a light decoder (8 blocks, 512 wide at ViT-B)
gets the encoded visible tokens plus mask tokens, with fixed 2-D sin-cos position embeddings on both
sides, and predicts the pixels of every patch; the loss is the MSE on masked patches only, against
per-patch normalised pixels when `norm_pix_loss` is on (MAE's default for its best results).
Parameter names follow the official release, so its checkpoints load as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimkit import keyed_random as draws
from mimkit.backbones import ViTBackbone, build_backbone, sincos_pos_embed_2d
from mimkit.config import Config, method_options
from mimkit.losses import masked_mse
from mimkit.masking import num_masked, random_mask, scatter_tokens, visible_indices
from mimkit.methods.base import Method, init_xavier_linears
from mimkit.patches import mask_to_pixels, patchify, unpatchify
from mimkit.targets import patch_pixels, unnormalize_patches


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16


class MAEGenerator(nn.Module):
    """MAE encoder + decoder; also the generator of Vision ELECTRA / GAN-MAE (hence `latent_noise_std`)."""

    def __init__(self, encoder: ViTBackbone, opts: MAEOptions, outputs_per_pixel: int = 1):
        """`outputs_per_pixel` > 1: logits over that many levels per pixel value (CIM's MAE-style generator)."""
        super().__init__()
        if not isinstance(encoder, ViTBackbone):
            raise ValueError("MAE needs model.arch=vit (its encoder drops masked tokens, which Swin cannot)")
        self.encoder, self.opts = encoder, opts
        self.num_visible = encoder.num_patches - num_masked(encoder.num_patches, opts.mask_ratio)
        out_dim = encoder.patch_size[0] * encoder.patch_size[1] * encoder.in_chans * outputs_per_pixel
        dim = opts.decoder_dim
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, encoder.grid, cls_token=True), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dim, opts.decoder_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                             for _ in range(opts.decoder_depth)])
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, out_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears (patch embedding as a linear), N(0, .02) tokens."""
        w = self.encoder.model.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.model.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        init_xavier_linears(self)

    def mask(self, images: torch.Tensor) -> torch.Tensor:
        return random_mask(images.shape[0], self.encoder.grid, self.opts.mask_ratio, images.device)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, latent_noise_std: float = 0.0) -> torch.Tensor:
        """Predicted pixels of every patch [B, L, p*p*C] (in the target space: normalised per patch if norm_pix)."""
        ids_visible = visible_indices(mask, self.num_visible)                 # [B, K]
        latent = self.encoder.forward_visible(images, ids_visible)             # [B, 1+K, D]
        if latent_noise_std > 0:  # Vision ELECTRA Sec. 3.2: z + z~, z~ ~ N(0, std^2)
            latent = latent + draws.randn_like(latent) * latent_noise_std
        x = self.embed_for_decoder(latent, ids_visible)                        # [B, 1+L, Dd]
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]                 # [B, L, p*p*C]

    def embed_for_decoder(self, latent: torch.Tensor, ids_visible: torch.Tensor) -> torch.Tensor:
        """Encoder tokens of the visible patches [B, 1+K, D] -> the decoder's full grid [B, 1+L, Dd]: projected,
        mask tokens at the hidden positions, position embeddings added."""
        x = self.decoder_embed(latent)
        patches = scatter_tokens(x[:, 1:], ids_visible, self.mask_token[0, 0], self.encoder.num_patches)
        return torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed

    def target(self, images: torch.Tensor) -> torch.Tensor:
        return patch_pixels(images, self.encoder.patch_size, normalize=self.opts.norm_pix_loss)

    def pixels(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Prediction -> image [B, C, H, W]. With norm_pix_loss the prediction is un-normalised with the true
        patches' mean/std, as MAE's own visualisation does: fine for pictures, not for building training inputs."""
        if self.opts.norm_pix_loss:
            raw = patchify(images, self.encoder.patch_size)
            pred = unnormalize_patches(pred, raw)
        return unpatchify(pred, self.encoder.patch_size, self.encoder.grid, self.encoder.in_chans)


class MAE(Method):
    """MAE pre-training: `loss_mse` on masked patches (He et al., Sec. 3)."""

    options = MAEOptions
    archs = ("vit",)

    def __init__(self, cfg: Config, in_chans: int, opts: MAEOptions | None = None):
        super().__init__()
        self.opts = opts or method_options(cfg)
        self.generator = MAEGenerator(build_backbone(cfg.model, in_chans, mask_token=False), self.opts)

    @property
    def encoder(self) -> ViTBackbone:
        return self.generator.encoder

    def forward(self, images: torch.Tensor, stage: str = "model", carry: dict | None = None) -> dict:
        mask = self.generator.mask(images)                                     # [B, L] True = masked
        pred = self.generator(images, mask)
        loss = masked_mse(pred, self.generator.target(images), mask)
        return {"loss": loss, "parts": {"loss_mse": loss}}

    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        mask = self.generator.mask(images)
        recon = self.generator.pixels(self.generator(images, mask), images)
        keep = 1 - mask_to_pixels(mask, self.encoder.patch_size, self.encoder.grid).to(images.dtype)
        return [("original", images), ("masked", images * keep),
                ("reconstruction", images * keep + recon * (1 - keep))]

    def pretrained_parts(self, state_dict: dict) -> list:
        """Official MAE release ({'model': sd}, timm encoder keys + decoder keys; the decoder is optional, as
        `mae_pretrain_vit_base.pth` has none) or any mimkit run's encoder."""
        from mimkit.pretrained import mae_generator_parts
        return mae_generator_parts(self.generator, state_dict, decoder_required=False)
