"""Losses: small functions, tested against hand-computed values."""
from mimkit.losses.pixel import masked_l1, masked_mse

__all__ = ["masked_mse", "masked_l1"]
