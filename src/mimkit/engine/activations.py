"""Activation checkpointing (`train.activation_checkpointing`): a block keeps only its input during the forward and
recomputes its activations in the backward, trading about one more forward of the wrapped blocks for the memory of
their intermediates (Chen et al. 2016; PyTorch's `torch.utils.checkpoint`, non-reentrant, which composes with
`torch.compile`, autocast and FSDP2).

What is wrapped: every stack (an `nn.ModuleList` or `nn.Sequential`) whose members are all blocks - timm's ViT, Beit
and Swin transformer blocks, mimkit's decoder and discriminator blocks, ResNet bottlenecks - in the encoders,
decoders, discriminators and critics of any method; `true` wraps all of a stack, a number N its first N. Frozen
parts (tokenizers, loss networks) run without gradients and are left as they are. The RNG state (torch's, and the
keyed draws' keys and counter) is replayed in the recomputation (drop path, dropout), so gradients equal those of
the run without it.
"""
from __future__ import annotations

import types
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimkit.keyed_random import KeyedState, keyed, keyed_state

BLOCK_SUFFIXES = ("Block", "Bottleneck", "BasicBlock")


def is_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith(BLOCK_SUFFIXES)


def block_stacks(model: nn.Module) -> list[nn.Module]:
    """Every nn.ModuleList / nn.Sequential in `model` whose members are all blocks (what checkpointing wraps and
    fsdp shards)."""
    return [stack for stack in model.modules() if isinstance(stack, (nn.ModuleList, nn.Sequential)) and len(stack)
            and all(map(is_block, stack))]


def _replay_keyed_draws():
    """checkpoint's context_fn: the recomputation runs in the backward, outside the step's `keyed` block; it gets
    the keys and draw counter the forward had, so keyed drop path draws the same coins."""
    state = keyed_state()
    replay = KeyedState(state.keys, state.draws) if state is not None else None
    return nullcontext(), keyed(replay)


def _checkpointed_forward(self, *args, **kwargs):
    forward = type(self).forward
    if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
        return checkpoint(forward, self, *args, use_reentrant=False, context_fn=_replay_keyed_draws, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_blocks(model: nn.Module, blocks: bool | int) -> int:
    """Wraps the blocks of every block stack in `model` (all of each stack for True, its first `blocks` for a
    number); returns how many were wrapped. The weights and state dict keys are unchanged; a deep copy keeps the
    wrapping, bound to the copy."""
    if blocks is False or blocks == 0:
        return 0
    wrapped = 0
    for stack in block_stacks(model):
        for block in list(stack)[: len(stack) if blocks is True else blocks]:
            if "forward" not in vars(block):               # not wrapped yet, no forward of its own set elsewhere
                block.forward = types.MethodType(_checkpointed_forward, block)
                wrapped += 1
    return wrapped
