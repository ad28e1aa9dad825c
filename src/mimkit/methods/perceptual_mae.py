"""Perceptual MAE: Improving Visual Representation Learning through Perceptual Understanding (Tukra et al.;
shared/papers/003_60891aaf38b668c1.txt, Sec. 3, 4; Table 1): the single-scale losses (part 1), then the multi-scale
critics and MSG-MAE (part 2, below). mimkit follows the paper; where the official code (tractableai/perceptual-mae)
differs, its behaviour is an option, off by default.

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
  (null) is `even` for the losses with a critic and `every` for msssim / dvae-p, which have no critic to wait for. G's L1 and the
  critic's loss run every step. Epochs come from the step, so a resumed run keeps the parity.
- Logged: `loss_l1`, `loss_feature`, `loss_style`, `loss_adv`, `loss_critic`, D's mean outputs, and the Gram-matrix
  difference of every critic / tokenizer layer (`gram_diff_layer{j}`), which TensorBoard plots per layer.

Official code's behaviour, as options (all off by default):
- `l1_counted_twice`: its GAN loss and its perceptual loss dict both add the L1 term;
- `adversarial_weight`: it scales the adversarial term by an unpublished 0.7 (the paper: 1);
- `lsgan_square_batch_mean`: its LS-GAN squares the batch mean of D's output instead of averaging squares;
- `perceptual_epochs=every`: it has no even-epoch schedule;
- `losses_on_normalized_images`: it computes L1 and SSIM on ImageNet-normalised images (the paper does not say;
  mimkit's default, [0, 1] pixels, is the range SSIM's constants assume). Normalised images weigh L1 about 1 / std
  (2.8x on Fashion-MNIST, 4.4x on ImageNet) more against the perceptual and adversarial terms.
- `perceptual_without_gradient`: feature and style terms do not train G, as its MSG-GAN-P path (run under
  no_grad); its LS-GAN-P feature extractor keeps its gradient, so for LS-GAN-P the official behaviour is the
  default (off);
- `lsgan_half_on_fake`: its LS-GAN halves Eq. 4's fake term too (Mao et al.'s LSGAN; Eq. 4 as printed halves the
  real term only);
- `critic_feature_maps=blocks`: its MSG-GAN-P perceptual terms read the S-1 block outputs of the critic; mimkit's
  default also takes the final conv's map (S maps, one per scale).
With `l1_counted_twice`, `lsgan_square_batch_mean`, `adversarial_weight=0.7`, `losses_on_normalized_images` and
`perceptual_epochs=every`, mimkit's LS-GAN-P generator loss equals its code's formula on the same critic (tested).
Also different there and not an option: its critic ends in a sigmoid before the LS-GAN loss (mimkit: raw outputs, as
LS-GAN is defined), and it takes phi from a copy of the critic refreshed every 5 epochs; its MS-SSIM sums the SSIM
terms over scales, with L1 at every scale, clamped, over a bilinear pyramid (mimkit: Eq. 2 read as the mean of
(1 - SSIM) / 2 over 4 scales of a 2x2 average-pooled pyramid, L1 on the full image only).

Part 2 (Sec. 3.2-3.3; Table 1 rows 4-5). `loss=msg-gan-p` and `loss=stylegan2-ada-p` keep Eq. 6 unchanged ("the loss
function for training D and G remains unchanged": L1 on the full image, feature + style over the critic's maps,
LS-GAN) and change what the critic sees and how it is regularised:
- Multi-scale outputs (MSG-GAN): the `scales - 1` decoder blocks before the last each emit the image at 1 / 2^k
  scale through one linear "to RGB" per token ((p / 2^k)^2 C values, unpatchified; past one pixel per token, one
  value per token, average-pooled), coarsest first as MSG-GAN's generator grows (`rgb_order=coarse_to_fine`); the
  full scale is G(I_m). The official code emits them finest first from the same blocks (decoder blocks 2-6 of 8 give
  1/2 ... 1/32), an option (`rgb_order=fine_to_coarse`); it also makes them by a linear to full-size patches then a
  strided conv, where the issue and MSG-GAN ask for a 1x1 / linear to-RGB. Real images are average-pooled to the
  same scales (the official code: bilinear resizing).
- The critic (`discriminators.MultiScaleCritic`): the full image, then at each lower scale the reconstruction of that
  scale joined to its features (MSG-GAN's lin_cat; `critic_combine=simple`), minibatch std before the last block;
  `critic_block=msg` (MSG-GAN-P) or `residual` (StyleGANv2-ADA-P). Its S maps are phi_j of Eq. 3. Widths (the
  paper gives none): `critic_width` 16 channels at full scale doubling to `critic_max_width` 256, 9.7M parameters at
  224 px, chosen so that a StyleGANv2-ADA-P step costs about 1.8x an LS-GAN-P step in FLOPs, as Table 4's times
  (0.54 vs 1) do (`python benchmarks/perceptual_mae_cost.py`). Real images and
  the reconstruction get the same treatment; the critic learns from the detached pyramid.
- MSG-MAE (Sec. 3.3, Fig. 1; `msg_mae`, default on for both multi-scale losses, as Table 1 marks; off gives Table 2's
  "MAE + MSG-GAN-P" rows): the output of encoder block e (visible tokens) gets the decoder's projection, mask tokens
  and position embeddings (the same `decoder_embed`, mask token and positions as the decoder's input, as the official
  code; the paper does not say whether they are shared), is concatenated with the input of decoder block i (2d) and
  projected back to d by one linear layer before that block. Pairs (0-based; `skip_pairs`): decoder block i takes
  encoder block depth - 1 - i for i = 1 .. decoder_depth - 1 (ViT-B + 8 decoder blocks: encoder blocks 10, 9, ..., 4
  into decoder blocks 1, 2, ..., 7, deepest first, the official pairing). With msg_mae off, the generator is part 1's
  (same parameters and outputs) plus the to-RGB heads; export writes the encoder alone either way.
- StyleGANv2-ADA-P ("all modifications made to the discriminator in StyleGANv2-ADA"; the official path cannot run,
  so mimkit's choices are these):
  - residual critic blocks (StyleGAN2 "resnet" D) and minibatch std in groups of 4; no equalised learning rate or
    blur filter (plain convs, 2x2 average pooling);
  - R1 (`r1_gamma` 10, lazy every `r1_interval` 16 steps, the penalty multiplied by the interval, as StyleGAN2):
    gamma / 2 E ||grad_x D(x)||^2 with x the un-augmented full-scale real image, whose pooled pyramid and augmented
    views the critic reads (the official code grows gamma by 0.01 per use; not taken);
  - path-length regularisation (Sec. 2's "small changes in the input to the decoder lead to changes of a similar
    magnitude in the feature maps of the discriminator"): with z the decoder's input (the encoder's output tokens of
    the visible patches, [B, 1+K, D]) and phi_j the critic's maps of the reconstruction (frozen critic, as the
    critic sees it), y = sum_j <phi_j, n_j> / sqrt(H_j W_j), n_j ~ N(0, I); a_b = sqrt(mean over tokens of
    sum over channels of (dy / dz_b)^2); penalty mean_b (a_b - a)^2 with a the running mean of a_b (decay 0.01),
    weight `pl_weight` 2 every `pl_interval` 4 steps times the interval, on the perceptual epochs only (when the
    critic's maps are in G's loss); those steps run attention with the math kernel, which has a second derivative;
  - ADA (`discriminators.AdaptiveAugment`, see there): every image the critic sees, in both stages, with p driven by
    r_t = E[sign(D(real) - 0.5)] towards `ada_target` 0.6 every `ada_interval` 4 steps. The official code's
    accuracy-threshold heuristic and latent-reconstruction loss are not taken.
  R1, path length and ADA are also options of lsgan-p and msg-gan-p (`r1_gamma`, `pl_weight`, `ada`).
Table 2's "MSG-GAN" rows (adversarial without the perceptual term) are `feature_weight=0 style_weight=0`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mimkit.backbones import ViTBackbone, build_backbone
from mimkit.config import Config, method_options
from mimkit.discriminators import forward_frozen
from mimkit.discriminators.ada import OPS as ADA_OPS
from mimkit.discriminators.ada import AdaptiveAugment
from mimkit.discriminators.conv import CRITICS, ConvCritic
from mimkit.discriminators.multiscale import BLOCKS, COMBINES, MultiScaleCritic
from mimkit.losses import masked_mse
from mimkit.losses.gan import path_length_penalty, r1_penalty
from mimkit.losses.perceptual import (feature_matching_terms, image_pyramid, lsgan_discriminator_loss,
                                      lsgan_generator_loss, ms_ssim_l1_loss)
from mimkit.masking import visible_indices
from mimkit.methods.base import Method, Stage
from mimkit.methods.mae import MAEGenerator, MAEOptions
from mimkit.patches import mask_to_pixels, unpatchify

LOSSES = ("mse", "msssim", "lsgan-p", "dvae-p", "msg-gan-p", "stylegan2-ada-p")
MULTI_SCALE = ("msg-gan-p", "stylegan2-ada-p")
WITH_CRITIC = ("lsgan-p",) + MULTI_SCALE
LSGAN_MIDPOINT = 0.5       # between the LS-GAN targets 0 (reconstructed) and 1 (real): ADA's decision boundary
GENERATOR, CRITIC = Stage("generator", ("generator",)), Stage("critic", ("critic",))


@dataclass
class PerceptualMAEOptions:
    loss: str = "lsgan-p"                  # mse | msssim | lsgan-p | dvae-p | msg-gan-p | stylegan2-ada-p (Table 1)
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
    critic: str = "dcgan"                  # lsgan-p: dcgan (official code) | patchgan
    critic_width: int | None = None       # None: 64 (lsgan-p, the official critic), 16 (multi-scale critics)
    critic_depth: int = 4                  # lsgan-p: stride-2 blocks (their outputs are phi_j)
    perceptual_epochs: str | None = None   # even | odd | every (epochs counted from 1); None: even with a critic
    lsgan_half_on_fake: bool = False       # Eq. 4 as printed halves the real term only
    l1_counted_twice: bool = False         # official code
    lsgan_square_batch_mean: bool = False  # official code
    perceptual_without_gradient: bool = False   # official code
    losses_on_normalized_images: bool = False   # official code: L1 and SSIM on the data-normalised images
    # --- part 2 (Sec. 3.2-3.3): multi-scale outputs and critics, MSG-MAE skips, StyleGANv2-ADA's regularisers
    scales: int = 6                        # image scales the multi-scale critic sees, full first (official: 6)
    rgb_order: str = "coarse_to_fine"      # which decoder block emits which scale (official: fine_to_coarse)
    msg_mae: bool | None = None            # encoder -> decoder skips (Sec. 3.3); None: on for the multi-scale losses
    skip_pairs: list | None = None         # [[encoder block, decoder block], ...] 0-based; None: the official pairing
    critic_feature_maps: str = "all"      # multi-scale critics: all (the S-1 blocks' outputs and the final conv's) |
                                           # blocks (the official code's set: the S-1 blocks' outputs only)
    critic_block: str | None = None        # msg | residual; None: msg for msg-gan-p, residual for stylegan2-ada-p
    critic_combine: str = "lin_cat"        # lin_cat | simple (MSG-GAN's combine functions)
    critic_max_width: int = 256
    mbstd_group: int = 4                   # minibatch std group (StyleGAN2)
    r1_gamma: float | None = None          # None: 10 for stylegan2-ada-p, else 0 (off)
    r1_interval: int = 16                  # lazy R1 (StyleGAN2)
    pl_weight: float | None = None         # None: 2 for stylegan2-ada-p, else 0 (off)
    pl_interval: int = 4                   # lazy path-length regularisation (StyleGAN2)
    pl_decay: float = 0.01
    ada: bool | None = None                # None: on for stylegan2-ada-p
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 500.0                # images (thousands) for p to cross [0, 1]
    ada_p: float = 0.0                     # p at the start
    ada_ops: list = field(default_factory=lambda: list(ADA_OPS))

    def __post_init__(self):   # checked when the config is read
        choices = (("loss", LOSSES), ("critic", CRITICS), ("perceptual_epochs", (None, "even", "odd", "every")),
                   ("critic_feature_maps", ("all", "blocks")),
                   ("rgb_order", ("coarse_to_fine", "fine_to_coarse")), ("critic_block", (None,) + BLOCKS),
                   ("critic_combine", COMBINES))
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise ValueError(f"method.{key} must be one of {', '.join(str(a) for a in allowed if a)}, "
                                 f"not {getattr(self, key)!r}")
        if not 0 <= self.ssim_alpha <= 1:
            raise ValueError(f"method.ssim_alpha={self.ssim_alpha} is out of range: it must be in [0, 1]")
        if not 0 <= self.ada_target <= 1 or not 0 <= self.ada_p <= 1 or not 0 < self.pl_decay <= 1:
            raise ValueError("method.ada_target and method.ada_p must be in [0, 1], method.pl_decay in (0, 1]")
        for key, low in (("ssim_scales", 1), ("ssim_window", 2), ("critic_width", 1), ("critic_depth", 1),
                         ("decoder_depth", 1), ("scales", 2), ("critic_max_width", 1), ("mbstd_group", 1),
                         ("r1_interval", 1), ("pl_interval", 1), ("ada_interval", 1), ("ada_kimg", 1e-3),
                         ("r1_gamma", 0), ("pl_weight", 0)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise ValueError(f"method.{key}={value} is out of range: it must be {low} or more")
        if set(self.ada_ops) - set(ADA_OPS):
            raise ValueError(f"method.ada_ops={self.ada_ops} has unknown entries; choose from {', '.join(ADA_OPS)}")
        if self.norm_pix_loss and self.loss != "mse":
            raise ValueError("method.norm_pix_loss=true needs method.loss=mse: the perceptual losses compare images")
        if self.loss not in WITH_CRITIC and (self.ada or self.r1_gamma or self.pl_weight):
            raise ValueError(f"method.ada / r1_gamma / pl_weight need a critic (method.loss one of "
                             f"{', '.join(WITH_CRITIC)}), not loss={self.loss}")
        if self.multi_scale and self.scales - 1 > self.decoder_depth - 1:
            raise ValueError(f"method.scales={self.scales} needs {self.scales - 1} decoder blocks before the last to "
                             f"emit the lower scales: raise method.decoder_depth to {self.scales} or lower scales")
        if self.skip_pairs is not None and not (isinstance(self.skip_pairs, list) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p)
                for p in self.skip_pairs)):
            raise ValueError("method.skip_pairs must be a list of [encoder block, decoder block] pairs of 0-based "
                             "indices, e.g. [[10, 1], [9, 2]]")

    @property
    def epochs_rule(self) -> str:
        return self.perceptual_epochs or ("even" if self.loss in WITH_CRITIC else "every")

    @property
    def multi_scale(self) -> bool:
        return self.loss in MULTI_SCALE

    @property
    def stylegan2(self) -> bool:
        return self.loss == "stylegan2-ada-p"

    def resolved(self, key: str):
        """An option whose null default depends on the loss (msg_mae, critic_width, critic_block, r1_gamma, pl_weight,
        ada)."""
        value = getattr(self, key)
        if value is not None:
            return value
        return {"msg_mae": self.multi_scale, "critic_width": 16 if self.multi_scale else 64,
                "critic_block": "residual" if self.stylegan2 else "msg",
                "r1_gamma": 10.0 if self.stylegan2 else 0.0, "pl_weight": 2.0 if self.stylegan2 else 0.0,
                "ada": self.stylegan2}[key]


def default_skip_pairs(encoder_depth: int, decoder_depth: int) -> list[tuple[int, int]]:
    """The official MSG-MAE pairing: decoder block i (0-based, i >= 1) takes encoder block depth-1-i, deepest first
    (ViT-B + 8 decoder blocks: encoder blocks 10, 9, ..., 4 into decoder blocks 1, 2, ..., 7)."""
    return [(encoder_depth - 1 - i, i) for i in range(1, decoder_depth) if encoder_depth - 1 - i >= 0]


class Reconstruction(NamedTuple):
    mask: torch.Tensor            # [B, L] True = hidden
    pred: torch.Tensor            # the decoder's output per patch [B, L, p*p*C]
    image: torch.Tensor           # G(I_m) [B, C, H, W] (visible patches pasted if paste_visible)
    pyramid: list                 # multi-scale losses: [G(I_m), then the lower scales, finest first]; else [image]
    latent: torch.Tensor | None   # the decoder's input (the encoder's tokens), for path-length regularisation


class MultiScaleMAEGenerator(MAEGenerator):
    """MAE whose decoder blocks also emit images at lower scales (MSG-GAN), and whose decoder blocks can take skips
    from encoder blocks (MSG-MAE, Sec. 3.3). With neither, exactly MAEGenerator (same parameters and outputs)."""

    def __init__(self, encoder: ViTBackbone, opts: MAEOptions, scales: int = 1, rgb_order: str = "coarse_to_fine",
                 skip_pairs: list[tuple[int, int]] = ()):
        super().__init__(encoder, opts)
        dim, depth, p, c = opts.decoder_dim, opts.decoder_depth, encoder.patch_size[0], encoder.in_chans
        emitting = list(range(depth - scales, depth - 1))                          # the S-1 blocks before the last
        ks = range(scales - 1, 0, -1) if rgb_order == "coarse_to_fine" else range(1, scales)
        self.rgb_scale = dict(zip(emitting, ks))                                  # decoder block -> k (1 / 2^k)
        self.to_rgb = nn.ModuleDict({str(i): nn.Linear(dim, (p // 2 ** k) ** 2 * c if 2 ** k <= p else c)
                                     for i, k in self.rgb_scale.items()})
        self.skip_from = {dec: enc for enc, dec in skip_pairs}                    # decoder block -> encoder block
        self.skip_proj = nn.ModuleDict({str(dec): nn.Linear(2 * dim, dim) for dec in sorted(self.skip_from)})
        for m in list(self.to_rgb.values()) + list(self.skip_proj.values()):     # MAE's init for the new linears
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def rgb_image(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Decoder tokens [B, 1+L, Dd] -> the image at 1 / 2^k scale: each token's linear 'to RGB' gives its
        (p / 2^k)^2 pixels; past one pixel per token, one value per token, average-pooled."""
        p, grid, c = self.encoder.patch_size[0], self.encoder.grid, self.encoder.in_chans
        out = self.to_rgb[str(self.block_of_scale[k])](tokens[:, 1:]).float()
        if 2 ** k <= p:
            return unpatchify(out, p // 2 ** k, grid, c)
        return F.avg_pool2d(unpatchify(out, 1, grid, c), 2 ** k // p)

    @property
    def block_of_scale(self) -> dict[int, int]:
        return {k: i for i, k in self.rgb_scale.items()}

    def forward_scales(self, images: torch.Tensor, mask: torch.Tensor
                       ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(pred [B, L, p*p*C], the lower-scale images finest first, the decoder's input latent [B, 1+K, D])."""
        ids_visible = visible_indices(mask, self.num_visible)
        taps = sorted(set(self.skip_from.values()))
        if taps:
            latent, feats = self.encoder.forward_visible(images, ids_visible, return_layers=taps)
            encoder_block = dict(zip(taps, feats))
        else:
            latent = self.encoder.forward_visible(images, ids_visible)
        x = self.embed_for_decoder(latent, ids_visible)
        scales = {}
        for i, block in enumerate(self.decoder_blocks):
            if i in self.skip_from:    # Sec. 3.3: mask tokens + positions, concatenated (2d), one linear back to d
                skip = self.embed_for_decoder(encoder_block[self.skip_from[i]], ids_visible)
                x = self.skip_proj[str(i)](torch.cat([x, skip], dim=-1))
            x = block(x)
            if i in self.rgb_scale:
                scales[self.rgb_scale[i]] = self.rgb_image(x, self.rgb_scale[i])
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return pred, [scales[k] for k in sorted(scales)], latent

    def forward(self, images: torch.Tensor, mask: torch.Tensor, latent_noise_std: float = 0.0) -> torch.Tensor:
        return self.forward_scales(images, mask)[0]


class PerceptualMAE(Method):
    options = PerceptualMAEOptions
    archs = ("vit",)
    stages = (GENERATOR, CRITIC)

    @classmethod
    def check_config(cls, cfg, opts: PerceptualMAEOptions) -> None:
        h, w = cfg.model.img_size
        p = cfg.model.patch_size
        if opts.multi_scale:
            f = 2 ** (opts.scales - 1)
            if h % f or w % f:
                raise ValueError(f"model.img_size={list(cfg.model.img_size)} must be divisible by 2^(method.scales-1) = "
                                 f"{f} for {opts.scales} image scales; lower method.scales")
            if any((2 ** k < p and p % 2 ** k) or (2 ** k > p and 2 ** k % p) for k in range(opts.scales)):
                raise ValueError(f"model.patch_size={p} must be a power of 2 for multi-scale outputs (each scale is a "
                                 f"whole number of pixels per token, or whole tokens per pixel)")
        if cfg.train.compile and (opts.resolved("r1_gamma") or opts.resolved("pl_weight")):
            raise ValueError("train.compile=true cannot run R1 or path-length regularisation (torch.compile has no "
                             "double backward); set train.compile=false, or method.r1_gamma=0 and method.pl_weight=0")
        if opts.skip_pairs is not None and not opts.resolved("msg_mae"):
            raise ValueError("method.skip_pairs needs method.msg_mae=true")

    def __init__(self, cfg: Config, in_chans: int, opts: PerceptualMAEOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        encoder = build_backbone(cfg.model, in_chans, mask_token=False)
        mae_opts = MAEOptions(o.mask_ratio, o.norm_pix_loss, o.decoder_dim, o.decoder_depth, o.decoder_heads)
        skips = []
        if o.resolved("msg_mae"):
            skips = [tuple(p) for p in o.skip_pairs] if o.skip_pairs is not None else \
                default_skip_pairs(len(encoder.model.blocks), o.decoder_depth)
            bad = [p for p in skips if p[0] >= len(encoder.model.blocks) or not 0 < p[1] < o.decoder_depth]
            if bad:
                raise ValueError(f"method.skip_pairs {bad} name blocks that do not exist: encoder blocks are 0.."
                                 f"{len(encoder.model.blocks) - 1}, decoder blocks 1..{o.decoder_depth - 1}")
        if o.multi_scale or skips or o.resolved("pl_weight"):
            self.generator = MultiScaleMAEGenerator(encoder, mae_opts, o.scales if o.multi_scale else 1, o.rgb_order,
                                                    skips)
        else:
            self.generator = MAEGenerator(encoder, mae_opts)
        self.patch_size, self.grid, self.in_chans = encoder.patch_size, encoder.grid, in_chans
        self.stages = (GENERATOR, CRITIC) if o.loss in WITH_CRITIC else (GENERATOR,)
        img_size = tuple(cfg.model.img_size)
        if o.loss == "lsgan-p":
            self.critic = ConvCritic(in_chans, img_size, o.critic, o.resolved("critic_width"), o.critic_depth)
        elif o.multi_scale:
            self.critic = MultiScaleCritic(in_chans, img_size, o.scales, o.resolved("critic_width"), o.critic_max_width,
                                           o.resolved("critic_block"), o.critic_combine, o.mbstd_group)
        if o.resolved("ada"):
            self.augment = AdaptiveAugment(o.ada_target, o.ada_interval, o.ada_kimg, o.ada_p, tuple(o.ada_ops))
        if o.resolved("pl_weight"):
            self.register_buffer("pl_mean", torch.zeros(()))
        if o.loss == "dvae-p":
            self.attach_tokenizer(cfg, in_chans, None)

    @property
    def encoder(self):
        return self.generator.encoder

    def optim_groups(self):
        trainable = lambda module: [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # noqa: E731
        return {"generator": trainable(self.generator),
                "critic": trainable(self.critic) if hasattr(self, "critic") else []}

    @classmethod
    def inert_options(cls, o) -> list[tuple[str, str]]:
        critic = o.loss in WITH_CRITIC
        rules = [*((key, o.loss != "msssim", f"with method.loss={o.loss} (MS-SSIM only)")
                   for key in ("ssim_alpha", "ssim_scales", "ssim_window")),
                 *((key, o.loss in ("mse", "msssim"), f"with method.loss={o.loss} (no feature or style terms)")
                   for key in ("feature_weight", "style_weight")),
                 *((key, not critic, f"with method.loss={o.loss} (no critic)")
                   for key in ("critic", "critic_width", "critic_depth", "adversarial_weight")),
                 ("norm_pix_loss", o.loss != "mse", f"with method.loss={o.loss} (mse only)"),
                 ("r1_interval", critic and not o.resolved("r1_gamma"), "with method.r1_gamma=0 (no R1)"),
                 ("pl_interval", critic and not o.resolved("pl_weight"), "with method.pl_weight=0 (no path length)")]
        return [(key, why) for key, inert, why in rules if inert]

    def declared_terms(self) -> set[str]:
        terms = super().declared_terms()
        return terms | {self.epoch_term} if self.opts.loss != "mse" else terms

    def terms_at(self, step: int, epoch: int, total_steps: int) -> set[str]:
        terms = super().terms_at(step, epoch, total_steps)
        return terms | {self.epoch_term} if self.opts.loss != "mse" and self.perceptual_on(epoch) else terms

    def cost_points(self, total_steps: int) -> list[tuple[int, int, float]]:
        """The epoch rule's share of on and off epochs, and within each the lazy regularisers' cycle (R1 on 1 step
        in r1_interval, path length on 1 in pl_interval of the perceptual epochs)."""
        o = self.opts
        rule = o.epochs_rule if o.loss != "mse" else "every"
        epochs = [(1, 1.0)] if rule == "every" else [(0, 0.5), (1, 0.5)]
        r1 = o.r1_interval if o.resolved("r1_gamma") > 0 else 1
        pl = o.pl_interval if o.resolved("pl_weight") > 0 else 1
        period = math.lcm(r1, pl)
        kinds: dict[tuple[bool, bool], list[int]] = {}
        for s in range(period):                                   # one step of each kind, counted as often as it recurs
            kinds.setdefault((s % r1 == 0, s % pl == 0), [s, 0])[1] += 1
        return [(s, epoch, weight * n / period) for epoch, weight in epochs for s, n in kinds.values()]

    @property
    def epoch_term(self) -> str:
        """The loss term the epoch rule switches (method.perceptual_epochs), named for the warning."""
        return f"the {self.opts.loss} term ({self.opts.epochs_rule} epochs)"

    def perceptual_on(self, epoch: int) -> bool:
        """Whether the perceptual term applies in this 0-based epoch (the paper counts from 1)."""
        rule = self.opts.epochs_rule
        return rule == "every" or (epoch + 1) % 2 == (0 if rule == "even" else 1)

    def loss_space(self, images: torch.Tensor) -> torch.Tensor:
        """The images L1 and SSIM compare: [0, 1] pixels, or as normalised (`losses_on_normalized_images`)."""
        return images.float() if self.opts.losses_on_normalized_images else self.to_pixels(images, clamp=False)

    def reconstruct(self, images: torch.Tensor) -> Reconstruction:
        """G(I_m) (visible patches pasted if asked) and, for the multi-scale losses, the lower scales too."""
        mask = self.generator.mask(images)
        coarse, latent = [], None
        if isinstance(self.generator, MultiScaleMAEGenerator):
            pred, coarse, latent = self.generator.forward_scales(images, mask)
        else:
            pred = self.generator(images, mask)
        image = unpatchify(pred.float(), self.patch_size, self.grid, self.in_chans)
        if self.opts.paste_visible:
            hidden = mask_to_pixels(mask, self.patch_size, self.grid).bool()
            image = torch.where(hidden, image, images.float())
        return Reconstruction(mask, pred, image, [image] + coarse, latent)

    def real_view(self, images: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """The real images as the critic takes them: the image, or its average-pooled pyramid (full first)."""
        return image_pyramid(images, self.opts.scales) if self.opts.multi_scale else images

    def critic_views(self, *views):
        """Each view (an image or a pyramid) as the critic sees it: under ADA, augmented with one draw shared by
        all the views (the real and the reconstructed image of each index get the same transform)."""
        if not hasattr(self, "augment"):
            return views
        pyramids = [v if isinstance(v, list) else [v] for v in views]
        draw = self.augment.sample(pyramids[0][0].shape[0], tuple(pyramids[0][-1].shape[-2:]),
                                   pyramids[0][0].device)
        out = [self.augment.pyramid(p, draw) for p in pyramids]
        return [o if isinstance(v, list) else o[0] for o, v in zip(out, views)]

    def due(self, carry: dict, interval: int) -> bool:
        """Lazy regularisation (StyleGAN2): on steps 0, interval, 2 interval, ..."""
        return carry.get("step", 0) % interval == 0

    def val_headline(self, row: dict) -> dict[str, float]:
        """Held-out `val/loss` = the pixel loss (MSE, L1, MS-SSIM parts): the adversarial, feature and style terms
        move with the critic."""
        prefix = "generator/" if len(self.stages) > 1 else ""
        pixel = [row[prefix + name] for name in ("loss_mse", "loss_l1", "loss_msssim") if prefix + name in row]
        return {"loss_pixels": sum(pixel)} if pixel else {}

    # ------------------------------------------------------------------ stages
    def forward(self, images: torch.Tensor, stage: str = "generator", carry: dict | None = None) -> dict:
        carry = carry if carry is not None else {}
        if stage == "critic":
            return self.critic_stage(images, carry)
        return self.generator_stage(images, carry)

    def generator_stage(self, images: torch.Tensor, carry: dict) -> dict:
        o = self.opts
        pl_due = o.resolved("pl_weight") > 0 and self.due(carry, o.pl_interval) and self.perceptual_on(
            carry.get("epoch", 0))
        # double backward through attention needs the math kernel (flash / efficient kernels have no second derivative)
        with sdpa_kernel(SDPBackend.MATH) if pl_due else contextlib.nullcontext():
            rec = self.reconstruct(images)
        if o.loss == "mse":
            loss = masked_mse(rec.pred, self.generator.target(images), rec.mask)
            return {"loss": loss, "parts": {"loss_mse": loss}}
        carry["fake"] = [f.detach() for f in rec.pyramid] if o.multi_scale else rec.image.detach()
        fake_px, real_px = self.loss_space(rec.image), self.loss_space(images)
        l1 = (fake_px - real_px).abs().mean()
        on = self.perceptual_on(carry.get("epoch", 0))
        if o.loss == "msssim":
            if not on:
                return {"loss": l1, "parts": {"loss_l1": l1}}
            ssim_term, l1_term = ms_ssim_l1_loss(fake_px, real_px, o.ssim_alpha, o.ssim_scales, o.ssim_window)
            return {"loss": ssim_term + l1_term, "parts": {"loss_l1": l1, "loss_msssim": ssim_term}}
        parts = {"loss_l1": l1}
        loss = l1 * (2 if o.l1_counted_twice and o.loss in WITH_CRITIC else 1)
        if not on:
            return {"loss": loss, "parts": parts}
        if o.loss in WITH_CRITIC:
            fake_view, real_view = self.critic_views(rec.pyramid if o.multi_scale else rec.image,
                                                     self.real_view(images))
            fake_logits, fake_feats = forward_frozen(self.critic, fake_view)
            with torch.no_grad():
                _, real_feats = forward_frozen(self.critic, real_view)
            parts["loss_adv"] = adv = o.adversarial_weight * lsgan_generator_loss(fake_logits, o.lsgan_square_batch_mean)
            loss = loss + adv
            if pl_due:   # lazy: weighted by the interval, as StyleGAN2
                pl = path_length_penalty(fake_feats, rec.latent, self.pl_mean, o.pl_decay)
                parts["loss_path_length"] = pl
                parts["path_length_mean"] = self.pl_mean.detach().clone()
                loss = loss + o.resolved("pl_weight") * o.pl_interval * pl
        else:
            fake_feats = self.tokenizer_features(rec.image)
            with torch.no_grad():
                real_feats = self.tokenizer_features(images)
        if o.perceptual_without_gradient:
            fake_feats = [f.detach() for f in fake_feats]
        if o.multi_scale and o.critic_feature_maps == "blocks":   # the official set: the S-1 block outputs only
            fake_feats, real_feats = fake_feats[:-1], real_feats[:-1]
        feature, style = feature_matching_terms(fake_feats, real_feats)
        parts["loss_feature"] = o.feature_weight * torch.stack(feature).sum()
        parts["loss_style"] = o.style_weight * torch.stack(style).sum()
        for j, value in enumerate(style):
            parts[f"gram_diff_layer{j}"] = value.detach()
        return {"loss": loss + parts["loss_feature"] + parts["loss_style"], "parts": parts}

    def critic_stage(self, images: torch.Tensor, carry: dict) -> dict:
        """Eq. 4 on the real image and the generator stage's detached reconstruction; with StyleGANv2-ADA, R1 on the
        real images every `r1_interval` steps (weighted by the interval) and ADA's bookkeeping."""
        o = self.opts
        r1_due = o.resolved("r1_gamma") > 0 and self.due(carry, o.r1_interval)
        real = images.detach().requires_grad_(True) if r1_due else images
        fake = carry["fake"]
        fake = [f.to(images.dtype) for f in fake] if isinstance(fake, list) else fake.to(images.dtype)
        real_view, fake_view = self.critic_views(self.real_view(real), fake)
        real_logits, _ = self.critic(real_view)
        fake_logits, _ = self.critic(fake_view)
        loss = lsgan_discriminator_loss(real_logits, fake_logits, o.lsgan_half_on_fake, o.lsgan_square_batch_mean)
        parts = {"loss_critic": loss, "critic_real": real_logits.detach().float().mean(),
                 "critic_fake": fake_logits.detach().float().mean()}
        if r1_due:
            parts["loss_r1"] = r1 = r1_penalty(real_logits, real, o.resolved("r1_gamma"))
            loss = loss + o.r1_interval * r1
        if hasattr(self, "augment"):
            parts["ada_real_sign"] = self.augment.observe(real_logits, LSGAN_MIDPOINT)
            if carry.get("last_micro", True) and (carry.get("step", 0) + 1) % o.ada_interval == 0:
                self.augment.adjust()
            parts["ada_p"] = self.augment.p.detach().clone()
        return {"loss": loss, "parts": parts}

    def tokenizer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """phi of Eq. 7: the frozen tokenizer encoder's maps of [0, 1] pixels at its input size."""
        return self.tokenizer.features(self.tokenizer_input(self.to_pixels(images, clamp=False)))

    # ------------------------------------------------------------------ pictures and weights
    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """original | masked | reconstruction (visible patches pasted, as MAE's) | the decoder's whole output, then
        (multi-scale losses) each lower-scale output, enlarged."""
        rec = self.reconstruct(images)
        full = self.generator.pixels(rec.pred, images).to(images.dtype)
        keep = 1 - mask_to_pixels(rec.mask, self.patch_size, self.grid).to(images.dtype)
        rows = [("original", images), ("masked", images * keep), ("reconstruction", images * keep + full * (1 - keep)),
                ("decoder output", full)]
        for k, small in enumerate(rec.pyramid[1:], start=1):
            rows.append((f"1/{2 ** k} scale", F.interpolate(small, size=images.shape[-2:], mode="nearest")
                         .to(images.dtype)))
        return rows

    @classmethod
    def encoder_only_options(cls, options: dict) -> dict:
        """dVAE-P's encoder without its tokenizer file: the same MAE under L1 + MSE (probing needs no loss network)."""
        return {**options, "loss": "mse"} if options.get("loss") == "dvae-p" else options

    def pretrained_parts(self, state_dict: dict) -> list:
        """`--init FILE`: an official MAE release or any mimkit run (encoder; decoder if present)."""
        from mimkit.pretrained import mae_generator_parts
        return mae_generator_parts(self.generator, state_dict, decoder_required=False)
