"""Checkpoints: written atomically, plain data only (load with `weights_only=True`)."""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import pickle
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that can't be read, with a sentence naming the fix."""


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """A safetensors file written as checkpoints are (atomically), with the usual permissions (0644 under umask
    022; safetensors' own `save_file` makes 0600 files)."""
    from safetensors.torch import save
    save_atomic(save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata), path, raw=True)


def save_atomic(obj, path: str | Path, raw: bool = False) -> None:
    """torch.save (or, `raw`, the bytes `obj`) to a temporary file in the same folder, fsync, then rename over
    `path`: a crash mid-write leaves the previous file intact, and a failed write (full or read-only disk) leaves
    no partial file. A full disk shows as an OSError, as PyTorch's `RuntimeError: ... unexpected pos`, or as nothing
    at all (a short write torch does not check): all three end in one sentence, the last found by checking the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            try:
                f.write(obj) if raw else torch.save(obj, f)
            except RuntimeError as err:   # PyTorch's zip writer reports a short write (a full disk) this way
                raise OSError(errno.ENOSPC, f"the write stopped short: {str(err).splitlines()[0][:120]}") from None
            f.flush()
            os.fsync(f.fileno())
        # a short write can also pass silently (torch ignores a file object's count): check what reached the disk,
        # the zip's end record for torch.save (its tail only) or the size of raw bytes
        if not (tmp.stat().st_size == len(obj) if raw else zipfile.is_zipfile(tmp)):
            raise OSError(errno.ENOSPC, "the file on disk is incomplete")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path} ({err.strerror or err}); free disk space or choose a "
                              f"writable --out (the previous checkpoint, if any, is intact)") from None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict, loaded with weights_only=True (argparse.Namespace allowed, as in
    the official MAE/SimMIM training checkpoints); `.safetensors` files as their state dict; a DCP run (RUN, or one
    of its step directories) as its plain state with the whole weights under "model"."""
    path = Path(path)
    if path.name in (DCP_POINTER, DCP_BEST) and path.is_file():   # RUN/latest, RUN/best: the directory named
        path = latest_dcp_dir(path.parent, path.name)
    if is_dcp_checkpoint(path):                       # a run saved with train.checkpoint=dcp: RUN or a step directory
        return load_dcp_whole(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (a run's checkpoint is RUN/last.pt)")
    if path.suffix == ".safetensors":                 # a `mimkit export` (timm keys) or any safetensors state dict
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path} could not be read as safetensors ({type(err).__name__}); re-export or "
                                  f"re-copy it") from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({type(err).__name__}); "
                              f"it may be truncated or not a checkpoint: re-copy it") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    return obj


def find_resume_checkpoint(run: Path, warn=print) -> tuple[Path, dict] | None:
    """RUN/last.pt, or when it can't be read (torn by a crash or a full disk) the newest readable
    RUN/checkpoint-STEP.pt, with a warning: (path, checkpoint); None when the run has no checkpoint at all. A run
    saved with train.checkpoint=dcp: (the step directory RUN/latest points at, its plain state without weights),
    unless a whole checkpoint of a later step exists."""
    directory = latest_dcp_dir(run)
    whole = _find_whole_checkpoint(run, warn)
    if directory is not None:
        meta = load_checkpoint(directory / DCP_META)
        if whole is None or whole[1].get("step", 0) <= meta.get("step", 0):
            return directory, meta
    return whole


def _find_whole_checkpoint(run: Path, warn) -> tuple[Path, dict] | None:
    candidates = [run / "last.pt"] + sorted(run.glob("checkpoint-*.pt"), reverse=True)
    existing = [p for p in candidates if p.is_file()]
    for path in existing:
        try:
            obj = load_checkpoint(path)
        except CheckpointError:
            warn(f"warning: {path} can't be read (truncated?); trying an older checkpoint")
            continue
        if path.name != "last.pt" and existing[0].name == "last.pt":
            warn(f"warning: resuming from {path.name} (step {obj.get('step')}): the steps after it are run again")
        return path, obj
    if existing:
        raise CheckpointError(f"no checkpoint in {run} can be read ({', '.join(p.name for p in existing)}); "
                              f"start a new run with another --out")
    return None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def frozen_sources(method) -> dict:
    """{part: {"path", "sha256", "settings", ...}} for a method's frozen parts, stored in run checkpoints instead of
    the weights (settings: what a tokenizer reports of its architecture; then how the method uses it, e.g. a
    tokenizer's input_size and token_grid)."""
    out = {}
    for name, path in method.frozen_parts.items():
        settings = getattr(getattr(method, name), "settings", None)
        out[name] = {"path": path, "sha256": file_sha256(Path(path) / "last.pt" if Path(path).is_dir() else path),
                     **({"settings": settings()} if callable(settings) else {}), **method.frozen_use(name)}
    return out


def verify_frozen_sources(method, ckpt: dict, where) -> None:
    """A resumed run must reload the very files it was trained with."""
    for name, saved in ckpt.get("frozen", {}).items():
        path = method.frozen_parts.get(name)
        file = Path(path) / "last.pt" if path is not None and Path(path).is_dir() else path
        if file is None or not Path(file).is_file() or file_sha256(file) != saved["sha256"]:
            raise CheckpointError(f"{where} was trained with the frozen {name} from {saved['path']} (sha256 "
                                  f"{saved['sha256'][:12]}), but {path or 'nothing'} differs from it now; point the "
                                  f"config back at that file")


def is_run_checkpoint(obj: dict) -> bool:
    return obj.get("format") == "mimkit-run"


def state_dict_of(obj: dict) -> dict:
    """The model weights inside a run checkpoint or an official release ({'model': sd}, {'state_dict': sd}, sd)."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


# ------------------------------------------------------------------ reading DCP checkpoints (train.checkpoint=dcp)
DCP_POINTER = "latest"      # RUN/latest: the newest complete DCP step directory (engine/distributed_checkpoint.py)
DCP_META = "meta.pt"
DCP_BEST = "best"           # RUN/best: the step directory of train.keep_best's lowest value


def latest_dcp_dir(run: Path, name: str = DCP_POINTER) -> Path | None:
    """The step directory RUN/latest (or RUN/best) points at, None when the run has none."""
    pointer = run / name
    if not pointer.is_file():
        return None
    target = run / pointer.read_text().strip()
    if not (target / DCP_META).is_file():
        raise CheckpointError(f"{pointer} points at {target}, which holds no complete checkpoint; restore the "
                              f"directory or remove {pointer} to resume from last.pt")
    return target


def is_dcp_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / DCP_META).is_file() or (path / DCP_POINTER).is_file())


def resolve_dcp(path: Path) -> Path:
    """RUN, RUN/latest or a step directory -> the step directory."""
    if (path / DCP_META).is_file():
        return path
    found = latest_dcp_dir(path)
    if found is None:
        raise CheckpointError(f"{path} holds no DCP checkpoint (no {DCP_POINTER} pointer, no {DCP_META}); give "
                              f"RUN/last.pt or a run written with train.checkpoint=dcp")
    return found


class _SafeUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses, torch sizes, dtypes and layouts, paths and plain containers; nothing else."""
    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    TORCH = {"Size", "device", "memory_format", "layout"}
    OTHERS = {("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("torch.serialization", "_get_layout")}

    def find_class(self, module: str, name: str):
        if module in self.MODULES or (module, name) in self.OTHERS:
            return super().find_class(module, name)
        if module == "torch" and (name in self.TORCH or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "builtins" and name in ("set", "frozenset", "slice", "getattr"):
            return super().find_class(module, name)
        raise CheckpointError(f"the DCP index holds {module}.{name}, which a checkpoint has no reason to hold; "
                              f"it is not loaded")


@contextmanager
def single_process_quiet():
    """DCP warns on each call without a process group that it assumes one process: mimkit means it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def dcp_reader(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(directory / ".metadata", "rb") as f:
                metadata = _SafeUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return SafeReader(str(directory))


def load_dcp_whole(path: Path) -> dict:
    """A DCP run checkpoint (RUN, RUN/latest or a step directory) as one dict like `last.pt`'s: the plain state and
    the whole trained weights under "model" (no optimiser state), on the CPU, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    directory = resolve_dcp(Path(path))
    meta = load_checkpoint(directory / DCP_META)
    reader = dcp_reader(directory)
    index = reader.read_metadata().state_dict_metadata
    model = {key[len("model."):]: torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in index.items() if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    state = {"model": model}
    with single_process_quiet():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {**meta, "model": state["model"]}
