"""Linear probe on frozen features: BatchNorm without affine, then a linear layer (MAE / CAE protocol).

Optimiser by choice: 'sgd' (momentum 0.9, quick) or 'lars' (MAE/CAE: LARS, lr 6.4, 10 of 90 epochs warm-up,
no weight decay). Features are cached: the encoder is frozen and the probe uses no augmentation."""
from __future__ import annotations

import math

import torch
from torch import nn

from mimkit.eval.lars import LARS


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The probes' lr factor at a 0-based step: linear warm-up to 1 over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_head(head: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, epochs: int, batch_size: int,
               lr: float, optimizer: str = "sgd", weight_decay: float = 0.0, warmup_epochs: float = 0.0,
               seed: int = 0) -> nn.Module:
    """Trains a probe head on cached inputs with a cosine schedule (linear warm-up); returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "lars":
        opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"probe optimiser must be 'sgd' or 'lars', not {optimizer!r}")
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            scale = warmup_cosine(step, warmup, total)
            for group in opt.param_groups:
                group["lr"] = lr * scale
            loss = nn.functional.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


@torch.no_grad()
def top1(head: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    pred = torch.cat([head(x[i:i + chunk]).argmax(1) for i in range(0, len(x), chunk)])
    return 100.0 * (pred == y).float().mean().item()


def linear_probe(train_feats, train_labels, num_classes: int, epochs: int = 30, batch_size: int = 1024,
                 lr: float | None = None, optimizer: str = "sgd", seed: int = 0) -> nn.Module:
    """The trained BN + linear head. Default lr: 0.1 (SGD); 6.4 with LARS, MAE's and CAE's peak (0.1 x 16384/256),
    kept at any batch size because LARS sizes each step by the trust ratio, not by the lr alone."""
    torch.manual_seed(seed)
    head = linear_head(train_feats.shape[1], num_classes)
    if lr is None:
        lr = 6.4 if optimizer == "lars" else 0.1
    warmup = epochs / 9 if optimizer == "lars" else 0.0   # MAE/CAE: 10 warm-up epochs of 90
    return train_head(head, train_feats, train_labels, epochs, batch_size, lr, optimizer, 0.0, warmup, seed)


def linear_probe_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, epochs: int = 30, batch_size: int = 1024, lr: float | None = None,
                      optimizer: str = "sgd", seed: int = 0) -> float:
    """Top-1 (%) of BN(affine=False) + Linear trained on cached frozen features."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = linear_probe(train_feats, train_labels, num_classes, epochs, batch_size, lr, optimizer, seed)
    return top1(head, test_feats, test_labels)


class ProbedClassifier(nn.Module):
    """Frozen encoder + pooling + a trained probe head: a classifier for robustness tests and reports."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pool: str):
        super().__init__()
        self.encoder, self.head, self.pool = encoder.eval(), head.eval(), pool

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from mimkit.eval.features import embed
        return self.head(embed(self.encoder, images, self.pool).float())
