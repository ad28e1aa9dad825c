"""`train.parallel=fsdp`: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) instead of the flat gradient
all-reduce of `engine/dist.py` (`ddp`). Every transformer block is its own unit (parameters sharded over the ranks,
all-gathered for its forward and backward, gradients reduce-scattered while the backward goes on), the rest of the
method is the root unit. `train.reshard_after_forward=false` keeps the gathered blocks from forward to backward (the
ZeRO-2-like mode, for models that fit). On CUDA with bf16 the blocks compute in bf16 and reduce in fp32
(`MixedPrecisionPolicy`).

Every method runs under it: its parts' block stacks (encoders, decoders, discriminators, CIM's generator and
enhancer, whose shared layers are one unit) are sharded block by block and the rest - heads, embeddings, and the
frozen parts (tokenizers, loss networks: no gradients, never in an optimiser) - in the root unit, gathered for the
method's forward. Discriminators called with detached weights (`discriminators.forward_frozen`) detach the gathered
parameters as each submodule runs. GAN-MAE's adaptive gamma reads the gathered last layer inside the forward.
Checkpoints stay whole `last.pt` files (full state dicts gathered on every rank, written by rank 0), so export,
eval and `--init` read them as before; the optimiser state is stored by parameter name under ddp and fsdp alike, so
a run resumes under either, at any world size. The online probe gathers the weights on every rank and rank 0 probes
an unsharded copy of the encoder.
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
    # a block in two stacks (CIM's layers shared by generator and enhancer) is one unit
    blocks = list({id(block): block for stack in block_stacks(method) for block in stack}.values())
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
    """(model state dict, {group: optimiser state dict by parameter name}) whole, on the CPU: gathered on every rank
    (a collective) when `method` is sharded, a local copy otherwise. An optimiser that has not stepped yet is stored
    empty (DCP's getter would give it state by running a zero step, which a resume would then carry on from)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sharded = any(is_sharded(p) for p in method.parameters())
    states = {}
    for g, opt in optimizers.items():
        if sharded and opt.state:
            states[g] = get_optimizer_state_dict(method, opt, options=options)
        else:
            states[g] = _by_name(method, opt, opt.state_dict())
    if sharded:
        return get_model_state_dict(method, options=options), states
    return {k: v.detach().cpu() for k, v in method.state_dict().items()}, states


def load_optimizers(method: nn.Module, optimizers: dict, states: dict) -> None:
    """Optimiser states stored by parameter name (`full_state`), or by position (a run written before they were
    named), into the optimisers of `method`, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    sharded = any(is_sharded(p) for p in method.parameters())
    for g, opt in optimizers.items():
        state = states[g]
        named = not all(isinstance(i, int) for group in state["param_groups"] for i in group["params"])
        if not sharded:
            opt.load_state_dict(_by_position(method, opt, state) if named else state)
        elif state["state"]:       # one that had not stepped stays fresh
            state = state if named else _by_name(method, opt, state)
            set_optimizer_state_dict(method, opt, state, options=StateDictOptions(full_state_dict=True))


def _names_in_order(method: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in method.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_name(method: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A positional optimiser state dict (torch's own) keyed by the parameter names of `method` instead."""
    order = _names_in_order(method, optimizer)
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]}


def _by_position(method: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of `_by_name` for this optimiser's parameters."""
    index = {name: i for i, name in enumerate(_names_in_order(method, optimizer))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]]}


def sync_batchnorm(method: nn.Module, world_size: int, device: torch.device) -> int:
    """`train.sync_batchnorm`: every BatchNorm of the trained parts computes its statistics over the global batch
    (torch's SyncBatchNorm; the weights are the same Parameter objects); returns how many were converted. torch
    syncs only on GPUs, so a multi-process CPU run is refused with the fix."""
    if world_size == 1:
        return 0
    if device.type == "cpu":
        raise ValueError("train.sync_batchnorm needs GPUs (torch's SyncBatchNorm does not sync on the CPU); drop it "
                         "for a CPU run")
    frozen = set(getattr(method, "frozen_parts", ()))
    converted = 0
    for name, part in method.named_children():
        if name in frozen:
            continue
        before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in part.modules())
        setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(part))
        converted += before
    return converted
