"""A VQ-VAE tokenizer (van den Oord et al. 2017) with an EMA codebook and a commitment loss, the second kind of
tokenizer (CIM's Table 10 tries VQGAN's). The encoder and decoder are the dVAE's conv towers (`dvae.py`); the
quantiser is `vector_quantize_pytorch.VectorQuantize` (EMA codebook updates, k-means initialisation, dead-code
replacement), not written again here. The decoder ends in a sigmoid: images in [0, 1].
"""
from __future__ import annotations

import torch
from vector_quantize_pytorch import VectorQuantize

from mimkit.tokenizers.base import Tokenizer
from mimkit.tokenizers.dvae import conv_decoder, conv_encoder, encoder_features


class VQTokenizer(Tokenizer):
    kind = "vq"

    def __init__(self, in_chans: int = 3, vocab_size: int = 1024, codebook_dim: int = 64, n_hid: int = 64,
                 n_init: int = 64, groups: int = 3, blocks_per_group: int = 1, img_size: list | None = None,
                 ema_decay: float = 0.99, commitment_weight: float = 0.25, dead_code_threshold: float = 2.0):
        super().__init__()
        self.arch = dict(in_chans=in_chans, vocab_size=vocab_size, codebook_dim=codebook_dim, n_hid=n_hid,
                         n_init=n_init, groups=groups, blocks_per_group=blocks_per_group, img_size=img_size,
                         ema_decay=ema_decay, commitment_weight=commitment_weight,
                         dead_code_threshold=dead_code_threshold)
        self.in_chans, self.vocab_size, self.downsample, self.img_size = in_chans, vocab_size, 2 ** (groups - 1), img_size
        self.encoder = conv_encoder(in_chans, codebook_dim, n_hid, groups, blocks_per_group)
        self.quantizer = VectorQuantize(dim=codebook_dim, codebook_size=vocab_size, decay=ema_decay,
                                        commitment_weight=commitment_weight, kmeans_init=True,
                                        threshold_ema_dead_code=dead_code_threshold, accept_image_fmap=True)
        self.decoder = conv_decoder(codebook_dim, in_chans, n_hid, n_init, groups, blocks_per_group)

    def quantize(self, images: torch.Tensor):
        """(quantised latents [B, D, h, w] with straight-through gradients, ids [B, h, w], commitment loss)."""
        return self.quantizer(self.encoder(images.float()))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Negative squared distances of each latent to every codebook vector [B, V, h, w]."""
        z = self.encoder(images.float())                                       # [B, D, h, w]
        codebook = self.quantizer.codebook.float()                             # [V, D]
        dist = (z.pow(2).sum(1, keepdim=True) - 2 * torch.einsum("bdhw,vd->bvhw", z, codebook)
                + codebook.pow(2).sum(1).view(1, -1, 1, 1))
        return -dist

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(latents))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        latents = self.quantizer.codebook[ids].permute(0, 3, 1, 2)            # [B, D, h, w]
        return self.decode_latents(latents.float())

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return encoder_features(self.encoder, images.float())
