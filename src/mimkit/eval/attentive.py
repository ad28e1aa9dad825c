"""Attentive probing (CAE, Sec. 5.2 and Appendix A): a cross-attention unit whose query is its own learnt class
token and whose keys and values are the frozen encoder's patch tokens (the encoder's CLS excluded), with no MLP
and no skip connection; then BatchNorm (affine=False) and a linear classifier. SGD, momentum 0.9, no weight
decay, warm-up then cosine (CAE: 90 epochs, 10 warm-up, batch 8192, lr 0.4: `configs/probe/attentive_cae-appendix-a.yaml`,
the default of `mimkit eval attentive`, trained on augmented batches through the frozen encoder as the official
run_attentive.py; `attentive_cpu-small.yaml`, cached tokens for 30 epochs, is the report's and the benchmarks').

Checked against the paper (Appendix A: "the keys and the values are the patch representations output from the
encoder", no MLP, no skip, BatchNorm without affine, linear classifier): it matches. The official code
(Atten4Vis/CAE `AttentiveBlock`) differs in two ways not in the paper: LayerNorms on the query, key and value
inputs, and the encoder's CLS token among the keys and values; mimkit follows the paper."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mimkit.eval.linear import top1, train_head, warmup_cosine

RECIPES = Path(__file__).resolve().parents[3] / "configs" / "probe"
CAE_PROTOCOL = RECIPES / "attentive_cae-appendix-a.yaml"     # `mimkit eval attentive`'s default
CPU_SMALL = RECIPES / "attentive_cpu-small.yaml"             # eval report, the demo, the CPU benchmarks


@dataclass
class AttentiveConfig:
    """An attentive-probe protocol (a recipe in configs/probe/)."""
    epochs: int = 90
    warmup_epochs: float | None = 10.0    # None: a ninth of the epochs (CAE's 10 of 90)
    batch_size: int = 8192                # cut to the training set when larger
    lr: float = 0.4                       # at lr_batch, scaled linearly to the batch used
    lr_batch: int = 8192
    augment: bool = True                  # RandomResizedCrop + flip, features on the fly; false: cached tokens
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self):
        for key in ("epochs", "batch_size", "lr_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is out of range: it must be at least 1")
        if self.lr <= 0 or (self.warmup_epochs is not None and self.warmup_epochs < 0):
            raise ValueError("lr must be positive and warmup_epochs 0 or more")


def load_attentive_recipe(path=None, overrides=()) -> AttentiveConfig:
    from mimkit.config import build_dataclass, load_yaml, merge, parse_overrides
    return build_dataclass(AttentiveConfig, merge(load_yaml(path or CAE_PROTOCOL), parse_overrides(list(overrides))))


class CrossAttentionPool(nn.Module):
    """Learnt query token attends over patch tokens [B, L, D] -> [B, D]; `last_attention` keeps [B, H, L]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.last_attention: torch.Tensor | None = None

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, d = patches.shape
        h = self.num_heads
        q = self.q(self.query).reshape(1, 1, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)   # [B, H, 1, d/h]
        k = self.k(patches).reshape(b, n, h, d // h).transpose(1, 2)                             # [B, H, L, d/h]
        v = self.v(patches).reshape(b, n, h, d // h).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) * (d // h) ** -0.5).softmax(dim=-1)                     # [B, H, 1, L]
        self.last_attention = attn[:, :, 0].detach()
        return self.proj((attn @ v).transpose(1, 2).reshape(b, d))                              # no skip, no MLP


class AttentiveHead(nn.Sequential):
    def __init__(self, dim: int, num_heads: int, num_classes: int):
        super().__init__(CrossAttentionPool(dim, num_heads), nn.BatchNorm1d(dim, affine=False, eps=1e-6),
                         nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[2].weight, std=0.01)
        nn.init.zeros_(self[2].bias)


class AttentiveClassifier(nn.Module):
    """Frozen encoder (timm ViT) + attentive head; only the head's parameters are trainable."""

    def __init__(self, encoder: nn.Module, num_classes: int, num_heads: int | None = None):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.num_prefix = getattr(encoder, "num_prefix_tokens", 1)
        heads = num_heads or encoder.blocks[0].attn.num_heads
        self.head = AttentiveHead(encoder.embed_dim, heads, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()   # frozen: no dropout / drop path, whatever the mode
        return self

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.forward_features(images)[:, self.num_prefix:]   # patches only, CLS excluded

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.patch_tokens(images))


def attentive_probe(train_tokens: torch.Tensor, train_labels: torch.Tensor, num_classes: int, num_heads: int,
                    epochs: int = 30, batch_size: int = 1024, lr: float | None = None, warmup_epochs: float | None = None,
                    seed: int = 0) -> AttentiveHead:
    """Trains an attentive head on cached patch tokens [N, L, D]. Default lr: CAE's 0.4 at batch 8192, scaled."""
    torch.manual_seed(seed)
    head = AttentiveHead(train_tokens.shape[-1], num_heads, num_classes)
    lr = lr if lr is not None else 0.4 * batch_size / 8192
    warmup = warmup_epochs if warmup_epochs is not None else epochs / 9
    return train_head(head, train_tokens, train_labels, epochs, batch_size, lr, "sgd", 0.0, warmup, seed)


def attentive_probe_top1(train_tokens, train_labels, test_tokens, test_labels, num_heads: int, **kwargs) -> float:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = attentive_probe(train_tokens, train_labels, num_classes, num_heads, **kwargs)
    return top1(head, test_tokens, test_labels, chunk=1024)


def attentive_protocol_top1(encoder: nn.Module, train_set, test_set, img_size, mean, std, cfg: AttentiveConfig,
                            device="cpu", num_heads: int | None = None) -> float:
    """Top-1 (%) of an attentive probe trained by `cfg`: with augmentation, the frozen encoder (eval mode, no gradient)
    computes the patch tokens of every augmented batch; without, of the eval-transform images once (cached)."""
    from torch.utils.data import DataLoader

    from mimkit.data.sampler import ResumableSampler
    from mimkit.data.transforms import Augmented, PretrainTransform
    from mimkit.eval.features import extract_features, labels_of
    from mimkit.eval.finetune import evaluate, normalise
    device = torch.device(device)
    heads = num_heads or encoder.blocks[0].attn.num_heads
    batch = min(cfg.batch_size, len(train_set))
    lr = cfg.lr * batch / cfg.lr_batch
    warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else cfg.epochs / 9
    if not cfg.augment:
        tr = extract_features(encoder, train_set, img_size, mean, std, "tokens", device=device)
        te = extract_features(encoder, test_set, img_size, mean, std, "tokens", device=device)
        return attentive_probe_top1(*tr, *te, num_heads=heads, epochs=cfg.epochs, batch_size=batch, lr=lr,
                                    warmup_epochs=warmup, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    num_classes = int(labels_of(train_set).max()) + 1
    model = AttentiveClassifier(encoder, num_classes, heads).to(device)
    opt = torch.optim.SGD(model.head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    data = Augmented(train_set, PretrainTransform(img_size, cfg.crop_scale, hflip=cfg.hflip))
    steps_per_epoch = len(train_set) // batch
    total, warm = cfg.epochs * steps_per_epoch, round(warmup * steps_per_epoch)
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        loader = DataLoader(data, batch_size=batch, drop_last=True, num_workers=cfg.num_workers,
                            sampler=ResumableSampler(len(train_set), cfg.seed, epoch))
        for images, labels, _ in loader:
            for group in opt.param_groups:
                group["lr"] = lr * warmup_cosine(step, warm, total)
            loss = nn.functional.cross_entropy(model(normalise(images.to(device), mean_t, std_t)), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return evaluate(model.eval(), test_set, img_size, mean_t, std_t, device)
