"""Mask generators and keep/restore helpers, all made on the caller's device; inside a training step the draws are
keyed by each image (keyed_random.py), so a mask does not depend on the rank that holds the image.

Convention, everywhere in mimkit: a mask is bool [B, L] over the patch grid in row-major order,
True = masked (hidden from the encoder, predicted by the model).
"""
from __future__ import annotations

import math

import torch

from mimkit import keyed_random as draws


def random_mask(batch: int, grid: tuple[int, int], ratio: float, device: torch.device | str,
                count: int | None = None) -> torch.Tensor:
    """MAE's per-sample uniform random masking: exactly `count` masked patches per image (default MAE's
    `num_masked(L, ratio)`)."""
    num_patches = grid[0] * grid[1]
    count = num_masked(num_patches, ratio) if count is None else count
    noise = draws.rand(batch, num_patches, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise
    return ranks < count


def simmim_mask(batch: int, grid: tuple[int, int], ratio: float, mask_patch_px: int, model_patch_px: tuple[int, int],
                device: torch.device | str) -> torch.Tensor:
    """SimMIM's masking: random square mask patches of `mask_patch_px` pixels (32 at 224 px), upsampled to the patch grid."""
    ph, pw = model_patch_px
    if mask_patch_px % ph or mask_patch_px % pw:
        raise ValueError(f"mask patch size {mask_patch_px} must be a multiple of the model patch size {ph}x{pw}")
    sh, sw = mask_patch_px // ph, mask_patch_px // pw
    if grid[0] % sh or grid[1] % sw:
        raise ValueError(f"the patch grid {grid[0]}x{grid[1]} is not divisible by the mask patch ({sh}x{sw} patches); "
                         f"choose method.mask_patch_size so that the image size is a multiple of it")
    coarse_grid = (grid[0] // sh, grid[1] // sw)
    count = math.ceil(coarse_grid[0] * coarse_grid[1] * ratio)   # SimMIM's MaskGenerator: ceil(token_count * ratio)
    coarse = random_mask(batch, coarse_grid, ratio, device, count).reshape(batch, grid[0] // sh, grid[1] // sw)
    fine = coarse.repeat_interleave(sh, dim=1).repeat_interleave(sw, dim=2)
    return fine.reshape(batch, grid[0] * grid[1])


def block_mask(batch: int, grid: tuple[int, int], ratio: float, device: torch.device | str, min_block: int = 16,
               aspect: float = 0.3, attempts: int = 12) -> torch.Tensor:
    """BEiT/CAE block-wise masking, vectorised over the batch.

    Each attempt draws one rectangle per image (area uniform in [min_block, remaining], aspect ratio log-uniform
    in [aspect, 1/aspect]) and keeps it where the image stays within its budget, as BEiT's generator does.
    Deviation from BEiT: the few patches the blocks leave short are topped up at random, so every image
    has exactly round(L * ratio) masked patches (needed to batch encoders that see only visible tokens).
    """
    gh, gw = grid
    num_patches = gh * gw
    target = int(round(num_patches * ratio))
    min_block = min(min_block, max(1, target))
    rows = torch.arange(gh, device=device).view(1, gh, 1)
    cols = torch.arange(gw, device=device).view(1, 1, gw)
    mask = torch.zeros(batch, gh, gw, dtype=torch.bool, device=device)
    log_lo, log_hi = math.log(aspect), math.log(1 / aspect)
    for _ in range(attempts):
        remaining = (target - mask.sum((1, 2))).clamp(min=min_block).float()
        area = min_block + draws.rand(batch, device=device) * (remaining - min_block)
        ar = torch.exp(log_lo + draws.rand(batch, device=device) * (log_hi - log_lo))
        h = torch.sqrt(area * ar).round().clamp(1, gh).long()
        w = torch.sqrt(area / ar).round().clamp(1, gw).long()
        top = (draws.rand(batch, device=device) * (gh - h + 1)).floor().long()
        left = (draws.rand(batch, device=device) * (gw - w + 1)).floor().long()
        block = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                 & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
        grown = mask | block
        fits = grown.sum((1, 2)) <= target
        mask = torch.where(fits.view(-1, 1, 1), grown, mask)
    # Top up to exactly `target`: masked patches rank first, the rest in random order.
    score = mask.reshape(batch, -1).float() * 2 + draws.rand(batch, num_patches, device=device)
    ranks = score.argsort(dim=1, descending=True).argsort(dim=1)
    return ranks < target


def beit_min_block(num_patches: int) -> int:
    """BEiT's minimum block of 16 patches at 196 (14x14), scaled to another patch count (CAE, CIM's block masking)."""
    return max(1, round(16 * num_patches / 196))


def num_masked(num_patches: int, ratio: float) -> int:
    """How many patches MAE hides: L - int(L * (1 - ratio)), as the official code keeps int(L * (1 - ratio))."""
    return num_patches - int(num_patches * (1 - ratio))


def visible_indices(mask: torch.Tensor, num_visible: int) -> torch.Tensor:
    """Indices [B, num_visible] of the unmasked patches in ascending order.

    The count is passed in (no host sync); the mask is checked against it on the device, so a mask with
    another count (e.g. made by other code) fails instead of leaking masked patches into the encoder."""
    torch._assert_async((~mask).sum(1).eq(num_visible).all(),
                        f"the mask does not leave exactly {num_visible} visible patches per image")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible (0) first, each group in patch order
    return order[:, :num_visible]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens [B, L, D], indices [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(visible: torch.Tensor, indices: torch.Tensor, fill: torch.Tensor, length: int) -> torch.Tensor:
    """Put visible tokens [B, K, D] back at `indices` in a sequence of `length` filled with `fill` [D] (a mask token)."""
    b, _, d = visible.shape
    out = fill.to(visible.dtype).expand(b, length, d).clone()
    return out.scatter(1, indices.unsqueeze(-1).expand(-1, -1, d), visible)
