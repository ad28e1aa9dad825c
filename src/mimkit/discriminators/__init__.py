"""Discriminators: ViT backbone + heads (per-patch logits [B, L], image logits [B]) and convolutional critics."""
from mimkit.discriminators.conv import CRITICS, ConvCritic
from mimkit.discriminators.hierarchical import CNNPatchHead, HierarchicalDiscriminator, forward_frozen

__all__ = ["ConvCritic", "CRITICS", "CNNPatchHead", "HierarchicalDiscriminator", "forward_frozen"]
