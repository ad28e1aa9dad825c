"""Checkpoints: written atomically, plain data only (load with `weights_only=True`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that can't be read, with a sentence naming the fix."""


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict, loaded with weights_only=True (argparse.Namespace allowed, as in
    the official MAE/SimMIM training checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (a run's checkpoint is RUN/last.pt)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({type(err).__name__}); "
                              f"it may be truncated or not a checkpoint: re-copy it") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    return obj


def is_run_checkpoint(obj: dict) -> bool:
    return obj.get("format") == "mimkit-run"


def state_dict_of(obj: dict) -> dict:
    """The model weights inside a run checkpoint or an official release ({'model': sd}, {'state_dict': sd}, sd)."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj
