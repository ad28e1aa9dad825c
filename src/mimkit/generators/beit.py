"""CIM's auxiliary generator (shared/papers/001_a38ff8dcabd66665.txt, Sec. 2.1, Appendix A.3 Eq. 1-2, Table 13): a
small BEiT that predicts the frozen tokenizer's golden token ids at the masked positions, and the sampling of
replacement tokens from its output (Table 7's ablation: softmax at temperature 1, argmax, or uniform).

The small BEiT is a vanilla ViT (timm's, so it can share blocks with a ViT enhancer) with a learnt [MASK] embedding
replacing the masked patch embeddings, learnt 1-D absolute positions, no layer scale and no drop path, and a
linear head to the vocabulary.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mimkit import keyed_random as draws
from mimkit.backbones import build_backbone

SAMPLING_MODES = ("softmax", "argmax", "uniform")


class BEiTGenerator(nn.Module):
    """forward(images, mask [B, L] True = masked) -> logits over the vocabulary at every position [B, L, V]."""

    def __init__(self, model_cfg, in_chans: int, vocab_size: int, depth: int, embed_dim: int | None = None,
                 num_heads: int | None = None):
        super().__init__()
        cfg = dataclasses.replace(model_cfg, depth=depth, drop_path=0.0, embed_dim=embed_dim or model_cfg.embed_dim,
                                  num_heads=num_heads or model_cfg.num_heads)
        self.backbone = build_backbone(cfg, in_chans, mask_token=True, sincos_pos=False, init_values=None)
        self.head = nn.Linear(self.backbone.embed_dim, vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_masked(images, mask)[:, self.backbone.num_prefix:]
        return self.head(tokens)


def sample_replacements(logits: torch.Tensor, mode: str = "softmax") -> torch.Tensor:
    """Replacement ids [...] from logits [..., V], on the device, no host sync: `softmax` samples p = softmax(logits)
    (temperature 1, CIM's Eq. 2), `argmax` takes the most likely id, `uniform` ignores the generator."""
    if mode == "softmax":
        return draws.categorical(logits)
    if mode == "argmax":
        return logits.argmax(-1)
    if mode == "uniform":
        return draws.randint(logits.shape[-1], *logits.shape[:-1], device=logits.device)
    raise ValueError(f"unknown sampling {mode!r}; choose one of {', '.join(SAMPLING_MODES)}")


def replaced_token_labels(golden: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REVDET's labels [B, L]: 1 where a masked position got a token other than the golden one; a sampled token that
    equals the golden one counts as original (0), as does every visible position."""
    return ((corrupted != golden) & mask).float()
