"""Losses: small functions, tested against hand-computed values."""
from mimkit.losses.gan import GAN_KINDS, discriminator_loss, generator_loss
from mimkit.losses.pixel import logit_laplace_nll, masked_l1, masked_mse

__all__ = ["masked_mse", "masked_l1", "logit_laplace_nll", "discriminator_loss", "generator_loss", "GAN_KINDS"]
