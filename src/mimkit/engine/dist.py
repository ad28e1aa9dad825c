"""Process-group set-up for torchrun (gloo on CPU, NCCL on GPU) and gradient averaging.

Gradients are averaged after each stage's backward with one flat all-reduce per dtype, rather than
through DDP hooks: a method's stages may leave parameters unused (a discriminator in the generator's
stage), which DDP's bucketing does not allow without `find_unused_parameters`, and gradient
accumulation then needs no `no_sync`. The cost is no overlap of communication with backward.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device(requested: str | None = None) -> str:
    """The device to use: the one asked for, else $MIMKIT_DEVICE (e.g. cpu on a GPU machine), else cuda if present."""
    requested = requested or os.environ.get("MIMKIT_DEVICE")
    if requested:
        kind = requested.split(":")[0]
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {requested!r}; use cpu or cuda (cuda:N for one GPU)")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} was asked for but PyTorch sees no CUDA GPU; use --device cpu, "
                             f"or install a CUDA build of PyTorch that matches the driver")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(device: str | None = None) -> DistInfo:
    """Reads torchrun's environment; a plain `python`/`mimkit` call is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = default_device(device) != "cpu"     # an impossible request (cuda without a GPU) fails here
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of `params`, one flat buffer per dtype."""
    if world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:  # every rank runs the same graph, so the same parameters have no gradient
            continue
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the ranks (a logged loss is the global batch's, not rank 0's)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def broadcast_module(module: torch.nn.Module) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def gather_objects(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
