"""Which encoder a probe measures: a run checkpoint, an export, foreign weights, random init or raw pixels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mimkit.config import load_config
from mimkit.engine.checkpoint import CheckpointError, load_checkpoint
from mimkit.export import export_metadata, load_encoder, method_from_checkpoint
from mimkit.methods import build_for_encoder


@dataclass
class ProbeSubject:
    model: torch.nn.Module | None   # None: raw pixels
    img_size: list
    pool: str
    mean: list | None               # None: the dataset's own statistics
    std: list | None
    description: str
    timm_spec: tuple[str, dict] | None = None   # (model name, kwargs) to rebuild the encoder, e.g. for fine-tuning


def probe_subject(ckpt: str | None = None, config: str | None = None, init: str | None = None,
                  random_init: bool = False, raw_pixels: bool = False, overrides: list[str] | None = None,
                  in_chans: int = 1, seed: int = 0) -> ProbeSubject:
    if raw_pixels:
        cfg = load_config(config, overrides) if config else None
        size = cfg.model.img_size if cfg else None
        return ProbeSubject(None, size, "none", None, None, "raw pixels")
    if ckpt and Path(ckpt).suffix in (".safetensors", ".json"):
        if random_init:
            raise CheckpointError("--random-init needs a run checkpoint or --config, not an export")
        meta = export_metadata(ckpt)
        size = meta.get("img_size") or meta["kwargs"]["img_size"]   # exports before ResNets kept it only in kwargs
        return ProbeSubject(load_encoder(ckpt), size, meta.get("pool", "cls"),
                            meta.get("mean"), meta.get("std"), f"export {ckpt}", (meta["model_name"], meta["kwargs"]))
    if ckpt:
        obj = load_checkpoint(ckpt)
        method, cfg = method_from_checkpoint(obj, seed if random_init else None)
        stats = obj["data_stats"]
        if random_init:
            return ProbeSubject(method.encoder.model, cfg.model.img_size, cfg.model.pool, stats["mean"], stats["std"],
                                f"random init ({cfg.model.arch}-{cfg.model.size}, seed {seed})", timm_spec(method))
        return ProbeSubject(method.encoder.model, cfg.model.img_size, cfg.model.pool, stats["mean"], stats["std"],
                            f"{cfg.method['name']} run {ckpt} (step {obj['step']})", timm_spec(method))
    if not config:
        raise CheckpointError("name the encoder: --ckpt RUN/last.pt, --ckpt EXPORT.safetensors, "
                              "--config X.yaml with --init FILE or --random-init, or --raw-pixels")
    cfg = load_config(config, overrides)
    torch.manual_seed(seed)
    method = build_for_encoder(cfg, in_chans)
    description = f"random init ({cfg.model.arch}-{cfg.model.size}, seed {seed})"
    if init:
        from mimkit.engine.trainer import load_init
        description = load_init(method, init)
    elif not random_init:
        raise CheckpointError("with --config, add --init FILE (weights) or --random-init")
    return ProbeSubject(method.encoder.model, cfg.model.img_size, cfg.model.pool, cfg.data.mean, cfg.data.std,
                        description, timm_spec(method))


def timm_spec(method) -> tuple[str, dict]:
    return method.encoder.timm_name, method.encoder.timm_kwargs
