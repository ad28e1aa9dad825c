"""Perceptual MAE: Improving Visual Representation Learning through Perceptual Understanding (Tukra et al.;
shared/papers/003_60891aaf38b668c1.txt, Sec. 3.1, 4; Table 1). Part 1: the single-scale losses. mimkit follows the
paper; where the official code (tractableai/perceptual-mae) differs, its behaviour is an option, off by default.

- Generator G: MAE (ViT encoder on the visible 25 %, 8 x 512 decoder) whose decoder output at every patch is the
  full image G(I_m). Eq. 1 compares G(I_m) with I over the whole image, so the losses see the decoder's output at
  every patch; `paste_visible=true` pastes the visible patches back first (pictures and `eval recon` always show the
  pasted image, as MAE's do, so all four variants are measured alike).
- `loss` selects Table 1's rows (and Eq. 7):
  - `mse`: MAE's loss (masked patches, per-patch normalised pixels if `norm_pix_loss`), Table 1 row 1;
  - `msssim`: Eq. 2, alpha (1 - SSIM) / 2 averaged over 4 scales (3x3 block filter, 2x2 average pooling between
    scales) plus (1 - alpha) L1, alpha = 0.85 (Sec. 4) (`losses.perceptual.ms_ssim_l1_loss`);
  - `lsgan-p`: Eq. 6, L1 + Eq. 3 (feature matching delta_f 0.05, style delta_s 40 over the critic's intermediate
    maps phi_j) + Eq. 5's LS-GAN term; the critic learns Eq. 4;
  - `dvae-p`: Eq. 7, L1 + Eq. 3 with the frozen tokenizer's encoder as phi (`tokenizer.path`), no adversary.
- Pixel space: L1 and SSIM are computed on images in [0, 1] (the data's normalisation undone, not clamped, so
  gradients reach every pixel); SSIM's constants assume that range. The critic sees images as the model does
  (normalised); the tokenizer sees [0, 1] pixels resized to its input size.
- Eq. 4 as printed halves only the real term: 1/2 (D(I) - 1)^2 + D(G(I_m))^2; mimkit does so, and
  `lsgan_half_on_fake=true` halves both (Mao et al.).
- Critic (`discriminators.ConvCritic`): DCGAN-like as the official code (default) or PatchGAN (`critic=patchgan`).
  It learns from detached reconstructions every step (its own optimiser group, `critic`); G's feature, style and
  adversarial terms flow through it with its parameters detached (`discriminators.forward_frozen`).
- Schedule (Sec. 4): the perceptual term (feature + style + adversarial) applies on even-numbered epochs only,
  counting epochs from 1 as the text does, so the critic learns for a whole epoch before its features are used
  ("to give time for the discriminator to learn new features"). `perceptual_epochs=even|odd|every`; the default
  (null) is `even` for lsgan-p and `every` for msssim / dvae-p, which have no critic to wait for. G's L1 and the
  critic's loss run every step. Epochs come from the step, so a resumed run keeps the parity.
- Logged: `loss_l1`, `loss_feature`, `loss_style`, `loss_adv`, `loss_critic`, D's mean outputs, and the Gram-matrix
  difference of every critic / tokenizer layer (`gram_diff_layer{j}`), which TensorBoard plots per layer.

Official code's behaviour, as options (all off by default):
- `l1_counted_twice`: its GAN loss and its perceptual loss dict both add the L1 term;
- `adversarial_weight`: it scales the adversarial term by an unpublished 0.7 (the paper: 1);
- `lsgan_square_batch_mean`: its LS-GAN squares the batch mean of D's output instead of averaging squares;
- `perceptual_without_gradient`: its feature extractor runs without gradient, so feature and style terms do not
  train G;
- `perceptual_epochs=every`: it has no even-epoch schedule;
- `losses_on_normalized_images`: it computes L1 and SSIM on ImageNet-normalised images (the paper does not say;
  mimkit's default, [0, 1] pixels, is the range SSIM's constants assume). Normalised images weigh L1 about 1 / std
  (2.8x on Fashion-MNIST, 4.4x on ImageNet) more against the perceptual and adversarial terms.
Also different there and not an option: its critic ends in a sigmoid before the LS-GAN loss (mimkit: raw outputs, as
LS-GAN is defined), and it takes phi from a copy of the critic refreshed every 5 epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mimkit.backbones import build_backbone
from mimkit.config import Config, method_options
from mimkit.discriminators import forward_frozen
from mimkit.discriminators.conv import CRITICS, ConvCritic
from mimkit.losses import masked_mse
from mimkit.losses.perceptual import (feature_matching_terms, lsgan_discriminator_loss, lsgan_generator_loss,
                                      ms_ssim_l1_loss)
from mimkit.methods.base import Method, Stage
from mimkit.methods.mae import MAEGenerator, MAEOptions
from mimkit.patches import mask_to_pixels, unpatchify

LOSSES = ("mse", "msssim", "lsgan-p", "dvae-p")
GENERATOR, CRITIC = Stage("generator", ("generator",)), Stage("critic", ("critic",))


@dataclass
class PerceptualMAEOptions:
    loss: str = "lsgan-p"                  # mse | msssim | lsgan-p | dvae-p (Table 1 rows 1-3; Eq. 7)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False            # loss=mse only: MAE's per-patch normalised target
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    paste_visible: bool = False            # Eq. 1: the decoder's whole output against I
    ssim_alpha: float = 0.85               # Sec. 4
    ssim_scales: int = 4                   # N of Eq. 2
    ssim_window: int = 3                   # 3x3 block filter
    feature_weight: float = 0.05           # delta_f (Sec. 4)
    style_weight: float = 40.0             # delta_s (Sec. 4)
    adversarial_weight: float = 1.0        # Eq. 6 (the official code: 0.7)
    critic: str = "dcgan"                  # dcgan (official code) | patchgan
    critic_width: int = 64
    critic_depth: int = 4                  # stride-2 blocks (their outputs are phi_j)
    perceptual_epochs: str | None = None   # even | odd | every (epochs counted from 1); None: even for lsgan-p
    lsgan_half_on_fake: bool = False       # Eq. 4 as printed halves the real term only
    l1_counted_twice: bool = False         # official code
    lsgan_square_batch_mean: bool = False  # official code
    perceptual_without_gradient: bool = False   # official code
    losses_on_normalized_images: bool = False   # official code: L1 and SSIM on the data-normalised images

    def __post_init__(self):   # checked when the config is read
        if self.loss not in LOSSES:
            raise ValueError(f"method.loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.critic not in CRITICS:
            raise ValueError(f"method.critic must be one of {', '.join(CRITICS)}, not {self.critic!r}")
        if self.perceptual_epochs not in (None, "even", "odd", "every"):
            raise ValueError(f"method.perceptual_epochs must be even, odd or every, not {self.perceptual_epochs!r}")
        if not 0 <= self.ssim_alpha <= 1:
            raise ValueError(f"method.ssim_alpha={self.ssim_alpha} is out of range: it must be in [0, 1]")
        for key, low in (("ssim_scales", 1), ("ssim_window", 2), ("critic_width", 1), ("critic_depth", 1),
                         ("decoder_depth", 1)):
            if getattr(self, key) < low:
                raise ValueError(f"method.{key}={getattr(self, key)} is out of range: it must be {low} or more")
        if self.norm_pix_loss and self.loss != "mse":
            raise ValueError("method.norm_pix_loss=true needs method.loss=mse: the perceptual losses compare images")

    @property
    def epochs_rule(self) -> str:
        return self.perceptual_epochs or ("even" if self.loss == "lsgan-p" else "every")


class PerceptualMAE(Method):
    options = PerceptualMAEOptions
    archs = ("vit",)
    stages = (GENERATOR, CRITIC)

    def __init__(self, cfg: Config, in_chans: int, opts: PerceptualMAEOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        encoder = build_backbone(cfg.model, in_chans, mask_token=False)
        self.generator = MAEGenerator(encoder, MAEOptions(o.mask_ratio, o.norm_pix_loss, o.decoder_dim, o.decoder_depth,
                                                          o.decoder_heads))
        self.patch_size, self.grid, self.in_chans = encoder.patch_size, encoder.grid, in_chans
        self.stages = (GENERATOR, CRITIC) if o.loss == "lsgan-p" else (GENERATOR,)
        if o.loss == "lsgan-p":
            self.critic = ConvCritic(in_chans, tuple(cfg.model.img_size), o.critic, o.critic_width, o.critic_depth)
        if o.loss == "dvae-p":
            self.attach_tokenizer(cfg, in_chans, None)

    @property
    def encoder(self):
        return self.generator.encoder

    def optim_groups(self):
        trainable = lambda module: [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # noqa: E731
        return {"generator": trainable(self.generator),
                "critic": trainable(self.critic) if hasattr(self, "critic") else []}

    def perceptual_on(self, epoch: int) -> bool:
        """Whether the perceptual term applies in this 0-based epoch (the paper counts from 1)."""
        rule = self.opts.epochs_rule
        return rule == "every" or (epoch + 1) % 2 == (0 if rule == "even" else 1)

    def loss_space(self, images: torch.Tensor) -> torch.Tensor:
        """The images L1 and SSIM compare: [0, 1] pixels, or as normalised (`losses_on_normalized_images`)."""
        return images.float() if self.opts.losses_on_normalized_images else self.to_pixels(images, clamp=False)

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask [B, L], the decoder's output [B, L, p*p*C], G(I_m) as an image, visible patches pasted if asked)."""
        mask = self.generator.mask(images)
        pred = self.generator(images, mask)
        image = unpatchify(pred.float(), self.patch_size, self.grid, self.in_chans)
        if self.opts.paste_visible:
            hidden = mask_to_pixels(mask, self.patch_size, self.grid).bool()
            image = torch.where(hidden, image, images.float())
        return mask, pred, image

    # ------------------------------------------------------------------ stages
    def forward(self, images: torch.Tensor, stage: str = "generator", carry: dict | None = None) -> dict:
        carry = carry if carry is not None else {}
        if stage == "critic":
            return self.critic_stage(images, carry)
        return self.generator_stage(images, carry)

    def generator_stage(self, images: torch.Tensor, carry: dict) -> dict:
        o = self.opts
        mask, pred, fake = self.reconstruct(images)
        if o.loss == "mse":
            loss = masked_mse(pred, self.generator.target(images), mask)
            return {"loss": loss, "parts": {"loss_mse": loss}}
        carry["fake"] = fake.detach()
        fake_px, real_px = self.loss_space(fake), self.loss_space(images)
        l1 = (fake_px - real_px).abs().mean()
        on = self.perceptual_on(carry.get("epoch", 0))
        if o.loss == "msssim":
            if not on:
                return {"loss": l1, "parts": {"loss_l1": l1}}
            ssim_term, l1_term = ms_ssim_l1_loss(fake_px, real_px, o.ssim_alpha, o.ssim_scales, o.ssim_window)
            return {"loss": ssim_term + l1_term, "parts": {"loss_l1": l1, "loss_msssim": ssim_term}}
        parts = {"loss_l1": l1}
        loss = l1 * (2 if o.l1_counted_twice and o.loss == "lsgan-p" else 1)
        if not on:
            return {"loss": loss, "parts": parts}
        if o.loss == "lsgan-p":
            fake_logits, fake_feats = forward_frozen(self.critic, fake)
            with torch.no_grad():
                _, real_feats = forward_frozen(self.critic, images)
            parts["loss_adv"] = adv = o.adversarial_weight * lsgan_generator_loss(fake_logits, o.lsgan_square_batch_mean)
            loss = loss + adv
        else:
            fake_feats = self.tokenizer_features(fake)
            with torch.no_grad():
                real_feats = self.tokenizer_features(images)
        if o.perceptual_without_gradient:
            fake_feats = [f.detach() for f in fake_feats]
        feature, style = feature_matching_terms(fake_feats, real_feats)
        parts["loss_feature"] = o.feature_weight * torch.stack(feature).sum()
        parts["loss_style"] = o.style_weight * torch.stack(style).sum()
        for j, value in enumerate(style):
            parts[f"gram_diff_layer{j}"] = value.detach()
        return {"loss": loss + parts["loss_feature"] + parts["loss_style"], "parts": parts}

    def critic_stage(self, images: torch.Tensor, carry: dict) -> dict:
        """Eq. 4 on the real image and the generator stage's detached reconstruction."""
        real, _ = self.critic(images)
        fake, _ = self.critic(carry["fake"].to(images.dtype))
        loss = lsgan_discriminator_loss(real, fake, self.opts.lsgan_half_on_fake, self.opts.lsgan_square_batch_mean)
        return {"loss": loss, "parts": {"loss_critic": loss, "critic_real": real.detach().float().mean(),
                                        "critic_fake": fake.detach().float().mean()}}

    def tokenizer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """phi of Eq. 7: the frozen tokenizer encoder's maps of [0, 1] pixels at its input size."""
        return self.tokenizer.features(self.tokenizer_input(self.to_pixels(images, clamp=False)))

    # ------------------------------------------------------------------ pictures and weights
    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """original | masked | reconstruction (visible patches pasted, as MAE's) | the decoder's whole output."""
        mask, pred, _ = self.reconstruct(images)
        full = self.generator.pixels(pred, images).to(images.dtype)
        keep = 1 - mask_to_pixels(mask, self.patch_size, self.grid).to(images.dtype)
        return [("original", images), ("masked", images * keep), ("reconstruction", images * keep + full * (1 - keep)),
                ("decoder output", full)]

    def pretrained_parts(self, state_dict: dict) -> list:
        """`--init FILE`: an official MAE release or any mimkit run (encoder; decoder if present)."""
        from mimkit.pretrained import mae_generator_parts
        return mae_generator_parts(self.generator, state_dict, decoder_required=False)
