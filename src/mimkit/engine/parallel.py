"""`train.parallel=fsdp`: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) instead of the flat gradient
all-reduce of `engine/dist.py` (`ddp`). Every transformer block is its own unit (parameters sharded over the ranks,
all-gathered for its forward and backward, gradients reduce-scattered while the backward goes on), the rest of the
method is the root unit. `train.reshard_after_forward=false` keeps the gathered blocks from forward to backward (the
ZeRO-2-like mode, for models that fit). On CUDA with bf16 the blocks compute in bf16 and reduce in fp32
(`MixedPrecisionPolicy`).

Built so far for the single-stage pixel methods (MAE, SimMIM: `config.FSDP_METHODS`, checked when the config is
read); the other methods call their parts' helpers outside `forward` (which FSDP2 must be told about, part by part)
and stay on `ddp`. Checkpoints stay whole `last.pt` files
(full state dicts gathered on every rank, written by rank 0), so export, eval and `--init` read them as before; the
optimiser state is stored by parameter name. Online probes are not run under fsdp yet.
"""
from __future__ import annotations

import torch
from torch import nn

from mimkit.engine.activations import block_stacks


def shard_method(method: nn.Module, reshard_after_forward: bool = True, bf16: bool = False) -> int:
    """fully_shard every block of every block stack, then the method as the root; returns the number of blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = [block for stack in block_stacks(method) for block in stack]
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(method, **kwargs)
    return len(blocks)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a norm over sharded gradients), any other tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_state(method: nn.Module, optimizers: dict) -> tuple[dict, dict]:
    """(model state dict, {group: optimiser state dict}) gathered whole on every rank (a collective), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(method, options=options),
            {g: get_optimizer_state_dict(method, opt, options=options) for g, opt in optimizers.items()})


def load_optimizers(method: nn.Module, optimizers: dict, states: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    for g, opt in optimizers.items():
        set_optimizer_state_dict(method, opt, states[g], options=StateDictOptions(full_state_dict=True))
