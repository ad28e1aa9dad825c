"""Weights out: the pre-trained encoder as a plain timm model (safetensors + JSON), and back in."""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from mimkit.config import config_from_dict
from mimkit.engine.checkpoint import CheckpointError, is_run_checkpoint, load_checkpoint, save_safetensors
from mimkit.methods import build_method


def method_from_checkpoint(obj: dict, random_init_seed: int | None = None):
    """(method, config) from a loaded run checkpoint: with the run's weights, or, given `random_init_seed`,
    the same architecture freshly initialised (the random-init baseline of the probes)."""
    if not is_run_checkpoint(obj):
        raise CheckpointError("this is not a mimkit run checkpoint (RUN/last.pt); for an official release "
                              "checkpoint use --init with --config")
    cfg = config_from_dict(obj["config"])
    if random_init_seed is not None:
        torch.manual_seed(random_init_seed)
    method = build_method(cfg, obj["in_chans"])
    method.set_pixel_stats(*(torch.tensor(obj["data_stats"][k]).view(1, -1, 1, 1) for k in ("mean", "std")))
    if random_init_seed is None:
        method.load_run_state(obj["model"])
    return method, cfg


def probed_kwargs(encoder, pool: str) -> dict:
    """timm.create_model kwargs under which `model(x)` returns the features the probes used: a ViT pools its patch
    tokens after the final norm for model.pool=mean (global_pool='avg' with fc_norm off, the same weights) or takes
    the CLS token ('token'); Swin and ResNet average their last map either way."""
    kwargs = dict(encoder.timm_kwargs, num_classes=0)
    if "global_pool" in kwargs:     # ViT (timm Beit for SimMIM's ViT names the switch use_fc_norm)
        norm_switch = "use_fc_norm" if kwargs.get("use_shared_rel_pos_bias") else "fc_norm"
        kwargs.update({"global_pool": "avg" if pool == "mean" else "token", norm_switch: False})
    return kwargs


def export_encoder(ckpt_path: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Writes OUT.safetensors (the encoder's timm state dict) and OUT.json (`model_name`, `kwargs` for
    `timm.create_model`, plus pooling and normalisation to use it as it was pre-trained)."""
    obj = load_checkpoint(ckpt_path)
    method, cfg = method_from_checkpoint(obj)
    encoder = method.encoder
    out = Path(out)
    out = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(encoder.model.state_dict(), str(out) + ".safetensors")
    meta = {"model_name": encoder.timm_name, "kwargs": probed_kwargs(encoder, cfg.model.pool),
            "img_size": cfg.model.img_size,
            "pool": cfg.model.pool,
            "mean": obj["data_stats"]["mean"], "std": obj["data_stats"]["std"],
            "method": cfg.method.get("name"), "step": obj["step"], "timm_version": timm.__version__}
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2))
    return Path(str(out) + ".safetensors"), Path(str(out) + ".json")


def load_encoder(path: str | Path) -> torch.nn.Module:
    """The encoder as a timm model from a run checkpoint (.pt) or an export (.safetensors/.json)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json") or Path(str(path) + ".json").exists():
        base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
        meta_path, weights_path = Path(str(base) + ".json"), Path(str(base) + ".safetensors")
        if not meta_path.exists() or not weights_path.exists():
            raise CheckpointError(f"an export is a pair {base}.safetensors + {base}.json; one of them is missing")
        meta = json.loads(meta_path.read_text())
        model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
        model.load_state_dict(load_file(str(weights_path)), strict=True)
        return model.eval()
    method, _ = method_from_checkpoint(load_checkpoint(path))
    return method.encoder.model.eval()


def export_metadata(path: str | Path) -> dict:
    base = Path(path).with_suffix("") if Path(path).suffix in (".safetensors", ".json") else Path(path)
    return json.loads(Path(str(base) + ".json").read_text())
