"""Attention maps (VE Fig. 6, Perceptual MAE Fig. 3, CAE Fig. 4): the last block's CLS-to-patch attention,
per head and averaged over heads, overlaid on the images as a PNG grid."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.engine.logging import save_titled_grid


@torch.no_grad()
def cls_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, heads, L]: softmax attention of the CLS query over the patch tokens in the last block of a timm ViT.
    timm fuses attention (SDPA), so the weights are recomputed from that block's q and k."""
    if not hasattr(model, "blocks") or getattr(model, "num_prefix_tokens", 0) < 1:
        raise ValueError("attention maps need a ViT encoder with a CLS token")
    block = model.blocks[-1]
    captured = {}
    handle = block.norm1.register_forward_hook(lambda mod, inp, out: captured.__setitem__("x", out))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    x = captured["x"]
    attn = block.attn
    b, n, c = x.shape
    h = attn.num_heads
    if getattr(attn, "q_bias", None) is not None:                           # BEiT-style (SimMIM's ViT): q/v biases
        qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(x)
    qkv = qkv.reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = getattr(attn, "q_norm", nn.Identity())(qkv[0]), getattr(attn, "k_norm", nn.Identity())(qkv[1])
    logits = (q * attn.scale) @ k.transpose(-2, -1)                           # [B, H, N, N]
    if getattr(model, "rel_pos_bias", None) is not None:                    # the shared relative position bias
        logits = logits + model.rel_pos_bias()
    if getattr(attn, "relative_position_bias_table", None) is not None:
        logits = logits + attn._get_rel_pos_bias()
    return logits.softmax(dim=-1)[:, :, 0, model.num_prefix_tokens:]


def overlay(gray: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """gray [B, 1, H, W] in [0, 1], heat [B, 1, H, W] in [0, 1] -> RGB [B, 3, H, W]: warm where attended."""
    colour = torch.cat([heat, heat.pow(2) * 0.6, 1 - heat], dim=1)
    return (0.45 * gray.expand(-1, 3, -1, -1) + 0.55 * colour).clamp(0, 1)


def patch_overlay(pixels: torch.Tensor, probs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A per-patch probability [B, L] as a heat map over images in [0, 1] [B, C, H, W] -> RGB [B, 3, H, W]
    (a discriminator's or an enhancer's per-token verdict)."""
    heat = torch.nn.functional.interpolate(probs.float().view(-1, 1, *grid), size=pixels.shape[-2:], mode="nearest")
    return overlay(pixels.float().mean(1, keepdim=True), heat)


@torch.no_grad()
def save_attention_grid(model, images: torch.Tensor, display: torch.Tensor, grid: tuple[int, int], path: Path,
                        min_tile: int = 84, title: str = "") -> torch.Tensor:
    """One row per image: the image, the head-averaged map, then each head, columns titled so; `display` is the
    image in [0, 1]."""
    attn = cls_attention(model, images).float().cpu()                          # [B, H, L]
    display = display.float().cpu()
    b, heads, _ = attn.shape
    maps = torch.cat([attn.mean(1, keepdim=True), attn], dim=1).reshape(b * (heads + 1), 1, *grid)
    lo, hi = maps.amin(dim=(2, 3), keepdim=True), maps.amax(dim=(2, 3), keepdim=True)
    maps = (maps - lo) / (hi - lo).clamp(min=1e-12)
    size = display.shape[-2:]
    maps = F.interpolate(maps, size=size, mode="nearest").reshape(b, heads + 1, 1, *size)
    gray = display[:, :3].mean(1, keepdim=True) if display.shape[1] != 1 else display
    tiles = []
    for i in range(b):
        tiles.append(display[i:i + 1, :3].expand(-1, 3, -1, -1) if display.shape[1] in (1, 3) else gray[i:i + 1].expand(-1, 3, -1, -1))
        tiles.append(overlay(gray[i:i + 1].expand(heads + 1, -1, -1, -1), maps[i]))
    columns = ["image", "mean"] + [f"head {h + 1}" for h in range(heads)]
    return save_titled_grid(torch.cat(tiles).float().cpu(), heads + 2, path,
                            title or "last-layer CLS attention (per head and their mean)", (), columns, min_tile)
