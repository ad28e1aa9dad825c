"""`train.checkpoint=dcp`: sharded checkpoints with `torch.distributed.checkpoint` (DCP).

Layout of a run: `RUN/checkpoints/step-NNNNNNN/` per save - DCP's files (each rank writes its own shards of the
trained weights and of the optimiser state, no gathering) and `meta.pt` (the run's plain state: step, config, every
rank's RNG, counters, frozen-part hashes, the optimisers' hyperparameters; written last, atomically) - and
`RUN/latest`, a one-line pointer to the newest complete step directory, replaced atomically only after every rank
has finished writing. A kill during a save leaves `latest` on the previous directory, which stays loadable; the
directories `latest` moved past are then removed (those of `train.keep_every` stay, and the one `RUN/best` points
at: with `train.keep_best`, the step of the lowest held-out loss, saved and pointed at like `latest`). `train.async_checkpoint` lets
the ranks go on training while DCP writes (`dcp.async_save`; the pointer moves when the write has finished, at the
next save or at the end of the run).

Loading reshards: DCP reads whatever part of each tensor a rank needs, so a run saved at one world size resumes at
another, under `ddp` or `fsdp`. `mimkit export`, `eval` and `--init` take RUN, RUN/latest or a step directory and
get the whole weights (`load_whole`). DCP keeps its index (`.metadata`) as a pickle; it is read with an unpickler
that builds only DCP's own metadata classes and torch's sizes and dtypes, so no code in a checkpoint can run (the
`weights_only` rule).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from mimkit.engine.checkpoint import (DCP_BEST, DCP_META, DCP_POINTER, dcp_reader, latest_dcp_dir, save_atomic,
                                      single_process_quiet)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _trained_state(method: nn.Module, optimizers: dict, frozen: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """(model state without the frozen parts, {group: optimiser tensor state}, {group: param_groups}), sharded as the
    method is; an optimiser that has not stepped is left out (DCP's getter would step it with zero gradients)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    prefixes = tuple(f"{name}." for name in frozen)
    model = {k: v for k, v in get_model_state_dict(method).items() if not (prefixes and k.startswith(prefixes))}
    states, groups = {}, {}
    for g, opt in optimizers.items():
        if opt.state:
            full = get_optimizer_state_dict(method, opt)
            states[g], groups[g] = full["state"], full["param_groups"]
    return model, states, groups


class DistributedCheckpointer:
    """Saves and loads a run's sharded checkpoints (the module docstring has the layout)."""

    def __init__(self, run: Path, is_main: bool, asynchronous: bool = False, keep_every: int = 0):
        self.run, self.is_main, self.asynchronous, self.keep_every = run, is_main, asynchronous, keep_every
        self.pending = None          # (future, directory, meta) of an async save not yet made current

    def save(self, step: int, meta: dict, method: nn.Module, optimizers: dict, frozen: tuple[str, ...],
             best: bool = False) -> None:
        """Every rank calls it (a collective). `best`: RUN/best points at this step too once it is complete (kept
        until another step is best)."""
        import torch.distributed.checkpoint as dcp
        self.finish()
        directory = self.run / "checkpoints" / f"step-{step:07d}"
        current = latest_dcp_dir(self.run)
        if current == directory:          # this step is already the complete latest (a stop right after a resume)
            if best:
                self._point_best(directory)
            return
        if self.is_main and directory.exists():   # left by a save that was killed: never pointed at
            shutil.rmtree(directory)
        self._barrier()
        model, states, groups = _trained_state(method, optimizers, frozen)
        meta = {**meta, "param_groups": groups, "checkpoint": "dcp"}
        state = {"model": model, "optim": states}
        single = not _distributed()
        with single_process_quiet():
            if self.asynchronous:      # the state is staged (copied to the CPU) before it returns; the write goes on
                response = dcp.async_save(state, checkpoint_id=str(directory), no_dist=single)
                self.pending = (getattr(response, "upload_completion", response), directory, meta, best)
            else:
                dcp.save(state, checkpoint_id=str(directory), no_dist=single)
        if not self.asynchronous:
            self._make_current(directory, meta, best)

    def finish(self) -> None:
        """Waits for an async save and makes it current (every rank calls it)."""
        if self.pending is not None:
            future, directory, meta, best = self.pending
            self.pending = None
            future.result()
            self._make_current(directory, meta, best)

    def _make_current(self, directory: Path, meta: dict, best: bool = False) -> None:
        self._barrier()                                   # every rank's shards are on disk
        if self.is_main:
            save_atomic(meta, directory / DCP_META)
            previous = latest_dcp_dir(self.run)
            _point(self.run / DCP_POINTER, directory)
            if best:
                self._point_best(directory)
            if previous is not None and previous != directory and not self._kept(previous):
                shutil.rmtree(previous, ignore_errors=True)
        self._barrier()

    def _point_best(self, directory: Path) -> None:
        if not self.is_main:
            return
        previous = latest_dcp_dir(self.run, DCP_BEST)
        _point(self.run / DCP_BEST, directory)
        if previous is not None and previous not in (directory, latest_dcp_dir(self.run)) and not self._kept(previous):
            shutil.rmtree(previous, ignore_errors=True)

    def _kept(self, directory: Path) -> bool:
        """A keep_every step, or the one RUN/best points at: not removed when `latest` moves on."""
        step = int(directory.name.split("-")[1])
        return (bool(self.keep_every) and step % self.keep_every == 0) or directory == latest_dcp_dir(self.run, DCP_BEST)

    @staticmethod
    def _barrier() -> None:
        if _distributed():
            torch.distributed.barrier()


def _point(pointer: Path, directory: Path) -> None:
    save_atomic(str(directory.relative_to(pointer.parent)).encode() + b"\n", pointer, raw=True)


def load_into(directory: Path, method: nn.Module, optimizers: dict, meta: dict, frozen: tuple[str, ...]) -> None:
    """The step directory's weights and optimiser state into `method` and `optimizers` (sharded or not), resharded
    to this world size (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    model, _, _ = _trained_state(method, {}, frozen)
    saved_groups = meta["param_groups"]
    states = {g: get_optimizer_state_dict(method, optimizers[g])["state"] for g in saved_groups}
    state = {"model": model, "optim": states}
    with single_process_quiet():
        dcp.load(state, storage_reader=dcp_reader(directory), no_dist=not _distributed())
    set_model_state_dict(method, state["model"], options=StateDictOptions(strict=False))
    for g, groups in saved_groups.items():
        set_optimizer_state_dict(method, optimizers[g], {"state": state["optim"][g], "param_groups": groups})
