"""Discriminators: backbone + heads, one output contract (per-patch logits [B, L], image logits [B])."""
from mimkit.discriminators.hierarchical import CNNPatchHead, HierarchicalDiscriminator, forward_frozen

__all__ = ["CNNPatchHead", "HierarchicalDiscriminator", "forward_frozen"]
