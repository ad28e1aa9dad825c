"""A distributed, seeded sampler that can start in the middle of an epoch (for resume)."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Yields (index, augmentation_seed) for one rank: a seeded permutation per epoch, sharded by rank,
    starting `skip` samples into this rank's share. Each sample's augmentation seed depends only on
    (seed, epoch, index), so resuming reproduces the crops of the uninterrupted run."""

    def __init__(self, length: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, skip: int = 0,
                 shuffle: bool = True, indices: torch.Tensor | None = None):
        self.indices = indices            # the images it deals (the rest held out), default all `length`
        self.length = length if indices is None else len(indices)
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size, self.skip, self.shuffle = rank, world_size, skip, shuffle
        self.per_rank = self.length // world_size

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=gen)
        else:
            order = torch.arange(self.length)
        if self.indices is not None:
            order = self.indices[order]
        mine = order[self.rank:self.per_rank * self.world_size:self.world_size][self.skip:]
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for index in mine.tolist():
            yield index, (base + index) % (2 ** 63)

    def __len__(self) -> int:
        return self.per_rank - self.skip
