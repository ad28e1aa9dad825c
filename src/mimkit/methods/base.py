"""The method contract every paper implementation follows, and the weight-loading helper they share.

A method is an nn.Module that
- declares its optimiser groups (`optim_groups`: name -> named parameters, each parameter in one group)
  and its update order (`stages`): each
  stage runs a forward for the named stage, one backward, and steps the optimisers of its groups;
- returns {"loss": scalar, "parts": {name: scalar}} from `forward(images, stage, carry)`; `carry` is a
  dict that lives through one training step, so a later stage can reuse what an earlier one made;
- never calls `optimizer.step()` itself: the engine does, in the declared order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    """One update in a training step: which forward to run and which optimiser groups it steps."""
    name: str
    groups: tuple[str, ...]


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model, with a sentence saying why and what to do."""


class Method(nn.Module):
    options: type = None                     # dataclass of the method's config keys (method.*)
    stages: tuple[Stage, ...] = (Stage("model", ("model",)),)

    def optim_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Optimiser group name -> the (name, parameter) pairs it updates; every trainable parameter in one group."""
        return {"model": [(n, p) for n, p in self.named_parameters() if p.requires_grad]}

    @property
    def encoder(self) -> nn.Module:
        """The backbone that is the result of pre-training (exported as a timm model)."""
        raise NotImplementedError

    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Rows of the sample grid, e.g. [("original", x), ("masked", ...), ("reconstruction", ...)]."""
        raise NotImplementedError

    def convert_checkpoint(self, state_dict: dict) -> dict:
        """Maps a foreign (e.g. official release) state dict onto this method's keys. Default: as is."""
        return state_dict


def load_matching(module: nn.Module, state_dict: dict, source: str) -> tuple[list[str], list[str]]:
    """Loads `state_dict` into `module`, raising one clear error on a shape mismatch.

    Returns (missing, unexpected) key lists; neither is an error here, the caller decides.
    """
    own = module.state_dict()
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointMismatch(_mismatch_sentence(key, tuple(value.shape), tuple(own[key].shape), source))
    result = module.load_state_dict(state_dict, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def _mismatch_sentence(key: str, theirs: tuple, ours: tuple, source: str) -> str:
    if key.endswith("patch_embed.proj.weight") and len(theirs) == 4 and theirs[1] != ours[1]:
        return (f"{source} was trained on {theirs[1]}-channel images but this model takes {ours[1]} channels; "
                f"use data with {theirs[1]} channels or start from scratch without --init")
    if key.endswith("patch_embed.proj.weight") and len(theirs) == 4 and theirs[2:] != ours[2:]:
        return (f"{source} uses patch size {theirs[2]}x{theirs[3]} but the config asks for {ours[2]}x{ours[3]}; "
                f"set model.patch_size={theirs[2]}")
    return (f"{source} does not fit this model: '{key}' has shape {list(theirs)} there and {list(ours)} here; "
            f"set model.size / model.embed_dim / model.depth to the checkpoint's architecture")
