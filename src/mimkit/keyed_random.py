"""Random draws keyed by the sample, not by a process's RNG stream (`train.randomness=keyed`).

A training step gives each image of its micro-batch a key (`sample_keys`: the run's seed, the epoch, the image's
place in the epoch's global order, the stage) and runs the method's forward inside `keyed(keys)`. Every draw there -
masks, sampled tokens, latent noise, drop path, ADA's augmentations - is then a counter-based hash of (the image's
key, the draw's number within the forward, the element), computed with integer ops on the device. So an image gets
the same mask whichever rank holds it and however many ranks there are, on a CPU as on a GPU, and after a resume:
a run whose layers see no batch statistics is the same run at any world size with the same global batch. Outside a
`keyed` block (evaluation, pictures, tests) the draws are torch's own.

The hash is the 32-bit integer finaliser `x ^= x >> 16; x *= 0x45d9f3b` (twice) - a bijection on 32-bit words whose
products fit in int64, so no overflow on any backend; uniforms carry 24 random bits. The draw counter is part of the
state `keyed_state` captures, so activation checkpointing replays the same draws in its recomputation
(engine/activations.py).
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

_WORD = 0xFFFFFFFF
_MULT = 0x45D9F3B


def _mix(x):
    """A bijective 32-bit hash of words in [0, 2^32): int64 tensors or Python ints."""
    x = ((x >> 16) ^ x) * _MULT & _WORD
    x = ((x >> 16) ^ x) * _MULT & _WORD
    return (x >> 16) ^ x


def _word(value: int) -> int:
    """An int of any size folded into a 32-bit word."""
    value %= 2 ** 64
    return (value ^ (value >> 32)) & _WORD


def sample_keys(seed: int, epoch: int, positions: torch.Tensor, salt: str = "") -> torch.Tensor:
    """Keys [B] (int64 words) of images at `positions` in an epoch's global order; `salt` (a stage name) gives a
    stage its own draws."""
    # the run's part is hashed in Python ints (the same ops): no host-to-device copy per step
    base = _mix(_mix(_word(seed) ^ _word(zlib.crc32(salt.encode())) ^ 0x9E3779B9) ^ _word(epoch * 0x9E3779B9))
    return _mix((positions.long() & _WORD) ^ base)


@dataclass
class KeyedState:
    keys: torch.Tensor            # [B] int64
    draws: int = 0                # draws made so far in this forward


_STATE: list[KeyedState] = []     # innermost last; a list (not a ContextVar) so torch.compile can trace it


def keyed_state() -> KeyedState | None:
    return _STATE[-1] if _STATE else None


@contextmanager
def keyed(keys: torch.Tensor | KeyedState | None):
    """Draws inside are keyed by `keys` (one per image of the batch); a captured `KeyedState` resumes its counter
    (checkpointing's recomputation); None leaves torch's RNG in charge."""
    if keys is None:
        yield
        return
    _STATE.append(KeyedState(keys.keys, keys.draws) if isinstance(keys, KeyedState) else KeyedState(keys))
    try:
        yield
    finally:
        _STATE.pop()


def _bits(batch: int, shape: tuple[int, ...], device) -> torch.Tensor | None:
    """[batch, *shape] 32-bit words of the active keys, or None outside a keyed block."""
    state = keyed_state()
    if state is None:
        return None
    keys = state.keys.to(device)
    copies, rest = divmod(batch, keys.shape[0])
    if rest or not copies:
        raise ValueError(f"a keyed draw for {batch} images inside a block keyed for {keys.shape[0]}")
    if copies > 1:   # a batch made of several views of the step's images (real and fake, concatenated): one key each
        copy = torch.arange(copies, device=device).repeat_interleave(keys.shape[0])
        keys = _mix(keys.repeat(copies) ^ (copy * 0x27D4EB2F & _WORD))
    state.draws += 1
    n = 1
    for size in shape:
        n *= size
    draw = _mix(keys ^ _word(state.draws * 0x85EBCA6B))
    element = torch.arange(n, device=device, dtype=torch.int64)
    return _mix(draw.view(batch, 1) ^ element.view(1, n)).view(batch, *shape)


def rand(batch: int, *shape: int, device=None) -> torch.Tensor:
    """Uniform [0, 1) floats [batch, *shape]: keyed per image inside `keyed`, else torch.rand."""
    bits = _bits(batch, shape, device)
    if bits is None:
        return torch.rand(batch, *shape, device=device)
    return (bits >> 8).float() * (1.0 / (1 << 24))


def randn(batch: int, *shape: int, device=None) -> torch.Tensor:
    """Standard normal floats [batch, *shape] (Box-Muller on two keyed uniforms), else torch.randn."""
    if keyed_state() is None:
        return torch.randn(batch, *shape, device=device)
    u = rand(batch, 2, *shape, device=device)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, 0]))         # 1 - u in (0, 1]: finite
    return radius * torch.cos(2 * torch.pi * u[:, 1])


def randn_like(x: torch.Tensor) -> torch.Tensor:
    return randn(x.shape[0], *x.shape[1:], device=x.device).to(x.dtype)


def randint(high: int, batch: int, *shape: int, device=None) -> torch.Tensor:
    """Integers in [0, high) [batch, *shape]."""
    if keyed_state() is None:
        return torch.randint(high, (batch, *shape), device=device)
    return (rand(batch, *shape, device=device) * high).long().clamp_(max=high - 1)


def categorical(logits: torch.Tensor) -> torch.Tensor:
    """One sample per row of logits [B, ..., V] (softmax at temperature 1): the inverse CDF at a keyed uniform,
    else torch's Categorical."""
    if keyed_state() is None:
        return torch.distributions.Categorical(logits=logits.float()).sample()
    cdf = logits.float().softmax(-1).cumsum(-1)
    u = rand(logits.shape[0], *logits.shape[1:-1], device=logits.device) * cdf[..., -1]
    return torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


class KeyedDropPath(nn.Module):
    """Stochastic depth (timm's DropPath: one coin per image, survivors scaled by 1 / keep) with the coin keyed by
    the image inside `keyed`."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        coin = (rand(x.shape[0], device=x.device) < keep).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return x * (coin / keep if self.scale_by_keep and keep > 0 else coin)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def key_drop_paths(model: nn.Module) -> int:
    """Replaces every timm DropPath in `model` by a KeyedDropPath (no state: the state dict is unchanged); returns
    how many."""
    from timm.layers import DropPath
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, DropPath):
                setattr(parent, name, KeyedDropPath(child.drop_prob, child.scale_by_keep))
                swapped += 1
    return swapped
