"""k-NN classification on frozen features (cosine similarity; majority or temperature-weighted vote)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, vote: str = "weighted", temperature: float = 0.07,
             chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of k-NN on L2-normalised features. 'weighted' votes with exp(sim / T) (as in
    Wu et al. 2018 / DINO); 'majority' counts neighbours."""
    if vote not in ("weighted", "majority"):
        raise ValueError(f"vote must be 'weighted' or 'majority', not {vote!r}")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        sims = test[start:start + chunk] @ train.T                         # [b, N]
        top_sims, top_idx = sims.topk(k, dim=1)
        neighbours = train_labels[top_idx]                                  # [b, k]
        weights = (top_sims / temperature).exp() if vote == "weighted" else torch.ones_like(top_sims)
        scores = torch.zeros(len(neighbours), num_classes).scatter_add_(1, neighbours, weights)
        correct += (scores.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / len(test)
