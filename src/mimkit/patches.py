"""Patchify / unpatchify images of any channel count and any (non-square) size."""
from __future__ import annotations

import torch


def as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def patchify(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, ph*pw*C], patches in row-major order, pixels (ph, pw, C) as in MAE."""
    ph, pw = as_pair(patch_size)
    b, c, h, w = images.shape
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}; resize or crop the images")
    gh, gw = h // ph, w // pw
    x = images.reshape(b, c, gh, ph, gw, pw)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, ph * pw * c)


def unpatchify(patches: torch.Tensor, patch_size: int | tuple[int, int], grid: tuple[int, int], channels: int) -> torch.Tensor:
    """[B, L, ph*pw*C] -> [B, C, gh*ph, gw*pw]; inverse of `patchify`."""
    ph, pw = as_pair(patch_size)
    gh, gw = grid
    b = patches.shape[0]
    x = patches.reshape(b, gh, gw, ph, pw, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, gh * ph, gw * pw)


def mask_to_pixels(mask: torch.Tensor, patch_size: int | tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Bool patch mask [B, L] -> float pixel mask [B, 1, H, W] (1 = masked)."""
    ph, pw = as_pair(patch_size)
    gh, gw = grid
    m = mask.reshape(-1, 1, gh, gw).to(torch.float32)
    return m.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)
