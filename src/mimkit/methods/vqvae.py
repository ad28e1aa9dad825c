"""Training a VQ-VAE tokenizer (van den Oord et al. 2017, Eq. 3, with the EMA codebook of its Appendix A.1) on
the same engine as pre-training: loss = reconstruction (`mse` by default, or `l1`) + commitment_weight x
||z_e - sg[e]||^2; the codebook follows the encoder outputs by exponential moving averages (no gradient, decay
0.99), k-means initialised on the first batch, and codes unused for a while are re-seeded from the batch
(`vector_quantize_pytorch`). VQGAN's perceptual and adversarial terms are not included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mimkit.config import Config, method_options
from mimkit.methods.base import Method
from mimkit.methods.dvae import code_usage, tokenizer_rows
from mimkit.tokenizers.vq import VQTokenizer


@dataclass
class VQVAEOptions:
    vocab_size: int = 1024
    codebook_dim: int = 64
    n_hid: int = 64
    n_init: int = 64
    groups: int = 3                      # down-sampling 2^(groups-1)
    blocks_per_group: int = 1
    ema_decay: float = 0.99
    commitment_weight: float = 0.25      # beta of Eq. 3
    dead_code_threshold: float = 2.0     # re-seed codes whose EMA cluster size falls below this
    recon_loss: str = "mse"              # mse | l1


class VQVAETraining(Method):
    options = VQVAEOptions

    def __init__(self, cfg: Config, in_chans: int, opts: VQVAEOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        if o.recon_loss not in ("l1", "mse"):
            raise ValueError(f"method.recon_loss must be mse or l1, not {o.recon_loss!r}")
        self.tokenizer = VQTokenizer(in_chans, o.vocab_size, o.codebook_dim, o.n_hid, o.n_init, o.groups,
                                     o.blocks_per_group, list(cfg.model.img_size), o.ema_decay, o.commitment_weight,
                                     o.dead_code_threshold)
        self.tokenizer.grid_for(cfg.model.img_size)

    @property
    def encoder(self):
        raise ValueError("a tokenizer run has no ViT encoder to probe or export; use it as tokenizer.path=RUN/last.pt")

    def forward(self, images: torch.Tensor, stage: str = "model", carry: dict | None = None) -> dict:
        x = self.to_pixels(images)
        quantised, ids, commit = self.tokenizer.quantize(x)
        decoded = self.tokenizer.decode_latents(quantised)
        recon = (decoded.float() - x).abs().mean() if self.opts.recon_loss == "l1" else (decoded.float() - x).pow(2).mean()
        with torch.no_grad():
            parts = {"loss_recon": recon, "loss_commit": commit.float(), "mse": (decoded.float() - x).pow(2).mean(),
                     "code_usage": code_usage(ids, self.opts.vocab_size)}
        return {"loss": recon + commit, "parts": parts}

    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return tokenizer_rows(self, images)
