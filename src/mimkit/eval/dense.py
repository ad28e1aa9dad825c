"""What the dense transfers (`eval segment`, `eval detect`) share: the pre-trained encoder rebuilt for inputs of any
size, layer-wise lr decay as BEiT's and MAE's code count it, per-sample seeded augmentation, and a run folder that
resumes exactly (model, optimiser, global RNG state and step in `last.pt`)."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mimkit.data import ResumableSampler
from mimkit.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from mimkit.eval.pyramid import is_vit


def require(what: str, cfg, ok: bool, key: str, rule: str) -> None:
    """A recipe value checked when the recipe is read: one sentence naming the key, its value and the rule."""
    if not ok:
        raise ValueError(f"{what}: {key}={getattr(cfg, key)!r} is out of range: it must be {rule}")


def dense_encoder(timm_name: str, timm_kwargs: dict, state: dict, drop_path: float, output_stride: int | None = None,
                  img_size=None) -> nn.Module:
    """The pre-trained encoder rebuilt for dense inputs of any size: a ViT interpolates its position table on the
    fly (timm's dynamic_img_size); a Beit is built at `img_size` (its relative position tables resized by timm's own
    filter) and takes that size only; a ResNet is dilated to `output_stride` when given."""
    kwargs = dict(timm_kwargs, num_classes=0)          # pooling kwargs kept: they decide which final norm exists
    if timm_name.startswith("beit"):
        kwargs["img_size"] = list(img_size)
        model = timm.create_model(timm_name, pretrained=False, drop_path_rate=drop_path, **kwargs)
        from timm.models.beit import checkpoint_filter_fn
        state = checkpoint_filter_fn(state, model)
    elif "embed_dim" in kwargs:
        model = timm.create_model(timm_name, pretrained=False, drop_path_rate=drop_path, dynamic_img_size=True,
                                  **kwargs)
    else:
        if output_stride:
            kwargs["output_stride"] = output_stride
        model = timm.create_model(timm_name, pretrained=False, drop_path_rate=drop_path, **kwargs)
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("head.", "fc.", "fc_norm."))]
    if result.missing_keys or unexpected:
        raise CheckpointError(f"the encoder's weights do not fit {timm_name}: missing {result.missing_keys[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model


def layer_decay_groups(encoder: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay over the encoder as BEiT's and MAE's code count it (embeddings layer 0, block i layer
    i + 1, the final norm layer depth + 1; scale decay^(depth + 1 - layer): the last block at decay^1; timm's
    `param_groups_layer_decay` on a headless encoder puts it at 1), no weight decay for 1-D parameters and
    position/class tokens. A ResNet takes timm's stage grouping."""
    from timm.optim import param_groups_layer_decay
    skip = set(getattr(encoder, "no_weight_decay", set)())
    if not is_vit(encoder):
        return param_groups_layer_decay(encoder, weight_decay=weight_decay, layer_decay=layer_decay,
                                        no_weight_decay_list=list(skip))
    depth, groups = len(encoder.blocks), {}
    for name, p in encoder.named_parameters():
        layer = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else \
            0 if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "rel_pos_bias")) else depth + 1
        decay = p.ndim > 1 and name not in skip
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def head_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """A head's parameters at lr scale 1, biases and norms without weight decay."""
    return [g for g in ({"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr_scale": 1.0},
                        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0})
            if g["params"]]


class Seeded(Dataset):
    """(index, seed) -> transform(image, target, seed) of the dataset's sample."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        image, target = self.dataset[index]
        return self.transform(image, target, seed)


def seeded_batches(data: Seeded, batch_size: int, seed: int, step: int, num_workers: int, pin_memory: bool,
                   collate_fn=None):
    """Batches from `step` on, epoch after epoch, in the global order `ResumableSampler` fixes by (seed, epoch)."""
    per_epoch = len(data) // batch_size
    epoch, done = divmod(step, per_epoch)
    while True:
        sampler = ResumableSampler(len(data), seed, epoch, skip=done * batch_size)
        yield from DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                              pin_memory=pin_memory, collate_fn=collate_fn,
                              generator=torch.Generator())    # its seed draw must not touch the global RNG
        epoch, done = epoch + 1, 0


def resume_run(out: Path, kind: str, config: dict, model: nn.Module, opt: torch.optim.Optimizer, resume: bool) -> int:
    """The step to start from: `out/last.pt`'s when resuming (model, optimiser and global RNG state restored),
    else 0; a finished or foreign run in `out` is refused with the fix."""
    last = out / "last.pt"
    if resume and last.is_file():
        ckpt = load_checkpoint(last)
        if ckpt.get("kind") != kind or ckpt["config"] != config:
            raise CheckpointError(f"{last} is not a {kind.removeprefix('mimkit-')} run with this recipe; resume it "
                                  f"with the same --recipe and --set values, or choose another --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        return ckpt["step"]
    if not resume and last.exists():
        raise FileExistsError(f"{out} already holds a {kind.removeprefix('mimkit-')} run (last.pt); pass --resume to "
                              f"continue it, or choose another --out")
    return 0


def save_run(out: Path, kind: str, config: dict, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    save_atomic({"kind": kind, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "rng": torch.get_rng_state(), "config": config}, out / "last.pt")


def save_titled(fig, path: str | Path, title: str) -> Path:
    """A grid of example pictures saved as a PNG: axes bare, the title above."""
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
