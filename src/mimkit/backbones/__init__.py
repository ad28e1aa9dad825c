"""Backbones: thin MIM adapters over timm models."""
from mimkit.backbones.resnet import RESNET_SIZES, ResNetBackbone
from mimkit.backbones.swin import SWIN_SIZES, SwinBackbone
from mimkit.backbones.vit import POSITIONS, VIT_SIZES, ViTBackbone, pool_tokens, sincos_pos_embed_2d

__all__ = ["ViTBackbone", "SwinBackbone", "ResNetBackbone", "VIT_SIZES", "POSITIONS", "SWIN_SIZES", "RESNET_SIZES", "pool_tokens", "sincos_pos_embed_2d",
           "build_backbone"]


def build_backbone(model_cfg, in_chans: int, mask_token: bool, sincos_pos: bool = True, init_values=None,
                   sincos_rows_first: bool = False):
    """Backbone from a `ModelConfig` (arch 'vit', 'swin' or 'resnet')."""
    common = dict(img_size=tuple(model_cfg.img_size), patch_size=model_cfg.patch_size, in_chans=in_chans,
                  size=model_cfg.size, drop_path=model_cfg.drop_path, mask_token=mask_token)
    if model_cfg.arch == "vit":
        return ViTBackbone(embed_dim=model_cfg.embed_dim, depth=model_cfg.depth, num_heads=model_cfg.num_heads,
                           sincos_pos=sincos_pos, init_values=init_values, sincos_rows_first=sincos_rows_first,
                           position=model_cfg.position, **common)
    if model_cfg.arch == "swin":
        return SwinBackbone(window_size=model_cfg.window_size, **common)
    if model_cfg.arch == "resnet":
        return ResNetBackbone(tuple(model_cfg.img_size), in_chans, model_cfg.size, model_cfg.output_stride,
                              model_cfg.drop_path, zero_init_last=model_cfg.zero_init_last)
    raise ValueError(f"unknown model.arch {model_cfg.arch!r}; use 'vit', 'swin' or 'resnet'")
