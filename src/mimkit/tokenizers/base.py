"""The interface every discrete image tokenizer gives the methods that use one (CIM, CAE, Perceptual MAE's dVAE-P).

Images in and out are in [0, 1] pixel space ([B, C, H, W]); token ids are [B, h, w] with h, w = H, W / `downsample`.
A tokenizer used inside a method is frozen: eval mode, no gradient (`Method.register_frozen`).
"""
from __future__ import annotations

import torch
from torch import nn


class Tokenizer(nn.Module):
    """encode / decode / logits / features, plus the checks a method runs before using it."""

    kind: str = ""
    vocab_size: int
    downsample: int
    in_chans: int
    img_size: list | None = None      # the size it was trained at (None: any multiple of `downsample`)
    arch: dict                        # constructor arguments: what a saved file needs to rebuild it

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> unnormalised log-probabilities over the vocabulary [B, V, h, w]."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> token ids [B, h, w] (the most likely code at each position)."""
        return self.logits(images).argmax(dim=1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images [B, C, H, W] in [0, 1]."""
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's intermediate maps, one per resolution (a loss network's layers)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """What identifies the architecture (stored beside the file hash in the runs that use it)."""
        return {"kind": self.kind, **self.arch, "downsample": self.downsample}

    def grid_for(self, img_size) -> tuple[int, int]:
        """The token grid of images of `img_size` [H, W]; one sentence if the size does not divide."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"the tokenizer down-samples by {self.downsample}, which does not divide images of "
                             f"{h}x{w}; feed it images whose sides are multiples of {self.downsample}")
        return h // self.downsample, w // self.downsample

    def input_size_for(self, grid: tuple[int, int] | None, requested=None, fallback=None) -> list[int]:
        """The size a method feeds this tokenizer: `requested` (tokenizer.input_size) when set; else the size
        whose token grid is `grid`, the grid the method predicts on (DALL-E under a 224 px ViT-B/16: 14x14 ->
        112 px, as BEiT, CIM and CAE feed it); with no such grid, the size it was trained at, else `fallback`."""
        if requested is not None:
            return list(requested)
        if grid is not None:
            return [grid[0] * self.downsample, grid[1] * self.downsample]
        return list(self.img_size or fallback)

    def check_fits(self, in_chans: int, input_size, patch_grid: tuple[int, int] | None) -> None:
        """A method's images and patch grid must match the tokenizer's channels and, at `input_size`, its token grid."""
        if in_chans != self.in_chans:
            raise ValueError(f"the tokenizer was trained on {self.in_chans}-channel images but the data has "
                             f"{in_chans} channels; train a tokenizer on this data (mimkit tokenizer train)")
        h, w = input_size
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"tokenizer.input_size={list(input_size)} is not a multiple of the tokenizer's "
                             f"down-sampling ({self.downsample}); set tokenizer.input_size to a multiple of it, or to "
                             f"null for the size that matches the model's patch grid")
        grid = self.grid_for(input_size)
        if patch_grid is not None and tuple(grid) != tuple(patch_grid):
            raise ValueError(f"the tokenizer gives a {grid[0]}x{grid[1]} token grid at tokenizer.input_size="
                             f"{list(input_size)} but the model predicts on a {patch_grid[0]}x{patch_grid[1]} grid; set "
                             f"tokenizer.input_size=[{patch_grid[0] * self.downsample},{patch_grid[1] * self.downsample}] "
                             f"(or null, which picks it)")
