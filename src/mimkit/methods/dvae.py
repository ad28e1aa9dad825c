"""Training DALL-E's discrete VAE as a tokenizer (Ramesh et al. 2021, Sec. 2.1 and Appendix A.2-A.3), on the
same engine as pre-training (`mimkit tokenizer train`).

Objective (the ELB of Eq. 1 with the Gumbel-softmax relaxation): the encoder's logits give q(z | x) over
`vocab_size` codes at every position; a relaxed one-hot sample z = GumbelSoftmax(logits, tau) goes through the
decoder, which predicts the logit-Laplace parameters of every pixel; loss = reconstruction + beta x KL(q || uniform).
- Temperature tau: cosine from 1 to 1/16 over the first `temperature_anneal` share of training (DALL-E: over 150k
  of 3M updates, 5 %); then 1/16.
- KL weight beta: cosine from 0 to 6.6 over the first `kl_warmup` share of training (DALL-E: 5000 updates).
- Normalisation (a choice: the paper sums over the whole image): the reconstruction NLL is the mean over pixel
  values and the KL, summed over positions, is divided by the same count, so their ratio is DALL-E's.
- Prior term (`kl_to_prior`): `per_position` (DALL-E's ELB: KL(q(z_i | x) || uniform) at every position i), or
  `batch_average` (an option, not DALL-E: KL of the batch-averaged q to uniform, times the number of positions,
  as wav2vec 2.0's diversity loss): it asks for all codes to be used without asking every single posterior
  to stay uncertain.
- Reconstruction: `logit_laplace` (DALL-E's; on pixels mapped to [0.1, 0.9]), or `l1` / `mse` on the decoded
  image in [0, 1] (options). Anneals read the step from the engine, so a resumed run continues them exactly.
Images reach the method normalised by the data's mean/std; the tokenizer sees them in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mimkit.config import Config, method_options
from mimkit.losses import logit_laplace_nll
from mimkit.methods.base import Method
from mimkit.tokenizers.dvae import DiscreteVAE, map_pixels


@dataclass
class DVAEOptions:
    vocab_size: int = 8192
    n_hid: int = 256
    n_init: int = 128
    groups: int = 4                      # down-sampling 2^(groups-1): 4 -> 8 (DALL-E), 3 -> 4 (28 px -> 7x7)
    blocks_per_group: int = 2
    recon_loss: str = "logit_laplace"    # logit_laplace | l1 | mse
    temperature_start: float = 1.0
    temperature_end: float = 0.0625      # 1/16
    temperature_anneal: float = 0.05     # share of the run over which tau is annealed (cosine)
    kl_weight: float = 6.6               # beta at the end of its warm-up
    kl_warmup: float = 0.0017            # share of the run over which beta rises from 0 (cosine)
    kl_to_prior: str = "per_position"    # per_position (DALL-E) | batch_average (see the docstring)


def cosine_ramp(start: float, end: float, step: int, length: int) -> float:
    """start -> end along a half cosine over `length` steps, then `end`."""
    if length <= 0 or step >= length:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / length))


class DVAETraining(Method):
    options = DVAEOptions

    def __init__(self, cfg: Config, in_chans: int, opts: DVAEOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        if o.recon_loss not in ("logit_laplace", "l1", "mse"):
            raise ValueError(f"method.recon_loss must be logit_laplace, l1 or mse, not {o.recon_loss!r}")
        if o.kl_to_prior not in ("per_position", "batch_average"):
            raise ValueError(f"method.kl_to_prior must be per_position or batch_average, not {o.kl_to_prior!r}")
        self.tokenizer = DiscreteVAE(in_chans, o.vocab_size, o.n_hid, o.n_init, o.groups, o.blocks_per_group,
                                     list(cfg.model.img_size))
        self.tokenizer.grid_for(cfg.model.img_size)    # fail now on a size the down-sampling does not divide

    @property
    def encoder(self):
        raise ValueError("a tokenizer run has no ViT encoder to probe or export; use it as tokenizer.path=RUN/last.pt")

    def anneals(self, carry: dict | None) -> tuple[float, float]:
        """(temperature, KL weight) at this step."""
        o = self.opts
        if not carry:
            return o.temperature_end, o.kl_weight
        total = carry["total_steps"]
        tau = cosine_ramp(o.temperature_start, o.temperature_end, carry["step"], round(o.temperature_anneal * total))
        beta = cosine_ramp(0.0, o.kl_weight, carry["step"], round(o.kl_warmup * total))
        return tau, beta

    def forward(self, images: torch.Tensor, stage: str = "model", carry: dict | None = None) -> dict:
        tau, beta = self.anneals(carry)
        x = self.to_pixels(images)                                                # [B, C, H, W] in [0, 1]
        logits = self.tokenizer.logits(x).float()                                 # [B, V, h, w]
        z = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)                  # relaxed one-hot
        output = self.tokenizer.decoder_output(z)                                 # [B, 2C, H, W]
        if self.opts.recon_loss == "logit_laplace":
            recon = logit_laplace_nll(map_pixels(x), output)
        else:
            decoded = self.tokenizer.image_from_output(output)
            recon = (decoded - x).abs().mean() if self.opts.recon_loss == "l1" else (decoded - x).pow(2).mean()
        log_q = F.log_softmax(logits, dim=1)
        positions = logits.shape[2] * logits.shape[3]
        if self.opts.kl_to_prior == "per_position":
            kl = (log_q.exp() * (log_q + math.log(self.opts.vocab_size))).sum(1)  # KL(q || uniform) per position
            loss_kl = kl.sum((1, 2)).mean() / x[0].numel()                        # per pixel value, as the NLL
        else:
            q_mean = log_q.exp().mean((0, 2, 3))                                  # [V] over batch and positions
            kl = (q_mean * (q_mean.clamp(min=1e-12).log() + math.log(self.opts.vocab_size))).sum()
            loss_kl = kl * positions / x[0].numel()
        with torch.no_grad():
            decoded = self.tokenizer.image_from_output(output)
            parts = {"loss_recon": recon, "loss_kl": loss_kl, "temperature": torch.tensor(tau, device=x.device),
                     "kl_weight": torch.tensor(beta, device=x.device), "mse": (decoded - x).pow(2).mean(),
                     "code_usage": code_usage(logits.argmax(1), self.opts.vocab_size)}
        return {"loss": recon + beta * loss_kl, "parts": parts}

    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return tokenizer_rows(self, images)


def code_usage(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Share of the vocabulary used in a batch of ids (no host sync)."""
    hits = torch.zeros(vocab_size, device=ids.device).scatter_add_(0, ids.flatten(), torch.ones(ids.numel(), device=ids.device))
    return (hits > 0).float().mean()


@torch.no_grad()
def tokenizer_rows(method: Method, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """original | reconstruction from the argmax tokens (what a method using the tokenizer gets back)."""
    tokenizer = method.tokenizer
    recon = tokenizer.decode(tokenizer.encode(method.to_pixels(images)))
    return [("original", images), ("reconstruction", method.from_pixels(recon))]
