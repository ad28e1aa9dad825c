"""Generators that corrupt an image for an enhancer or a discriminator to learn from (CIM's small BEiT)."""
from mimkit.generators.beit import SAMPLING_MODES, BEiTGenerator, replaced_token_labels, sample_replacements

__all__ = ["BEiTGenerator", "sample_replacements", "replaced_token_labels", "SAMPLING_MODES"]
