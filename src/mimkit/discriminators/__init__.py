"""Discriminators: ViT backbone + heads (per-patch logits [B, L], image logits [B]), convolutional and multi-scale
critics, and adaptive discriminator augmentation."""
from mimkit.discriminators.ada import AdaptiveAugment
from mimkit.discriminators.conv import CRITICS, ConvCritic
from mimkit.discriminators.hierarchical import CNNPatchHead, HierarchicalDiscriminator, forward_frozen
from mimkit.discriminators.multiscale import MultiScaleCritic

__all__ = ["AdaptiveAugment", "ConvCritic", "CRITICS", "CNNPatchHead", "HierarchicalDiscriminator", "forward_frozen",
           "MultiScaleCritic"]
