"""Linear probe on frozen features: BatchNorm without affine, then a linear layer (as MAE's probe)."""
from __future__ import annotations

import math

import torch
from torch import nn


def linear_probe_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, epochs: int = 30, batch_size: int = 1024, lr: float = 0.1,
                      weight_decay: float = 0.0, seed: int = 0) -> float:
    """Top-1 (%) of BN(affine=False) + Linear trained with SGD (momentum 0.9, cosine schedule) on cached
    features. Caching is valid because the encoder is frozen and the probe uses no augmentation."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_feats.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_feats.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_feats) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_feats), generator=gen)
        head.train()
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = nn.functional.cross_entropy(head(train_feats[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        pred = torch.cat([head(test_feats[i:i + 4096]).argmax(1) for i in range(0, len(test_feats), 4096)])
    return 100.0 * (pred == test_labels).float().mean().item()
