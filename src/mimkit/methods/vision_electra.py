"""Vision ELECTRA (VE): Adversarial Masked Image Modeling with Hierarchical Discriminator
(shared/papers/000_cad70c329f176929.txt).

A generator G (MAE by default, or SimMIM) fills the masked patches from a noisy latent, x^r = f(z + z~)
(Sec. 3.2); the reconstructed image keeps the original visible patches. A discriminator D (ViT with a CLS
token, Sec. 3.3) sees every token of the original and of the reconstructed image and says, per patch
(micro level, CNN head) and per image (macro level, linear head on CLS), which is original. G and D are
trained jointly on Eq. 5; the result of pre-training is D's backbone.

What G predicts: raw pixels in the dataset's normalisation (MAE with `norm_pix_loss` off). A per-patch
normalised prediction could only be turned back into pixels with the masked patches' own mean and
variance, which would leak the answer into the image D judges. Eq. 1 is likewise the MSE on raw pixels.

Gradient paths (tested): Eq. 3-4 see a detached reconstruction, so they reach D only; Eq. 2 runs D with
detached parameters (torch.func.functional_call), so it reaches G only; Eq. 1 reaches G only.
Batch reductions (the paper writes per-image losses): Eq. 3 averages over all 2·B·N patch verdicts
(originals and reconstructions), Eq. 4 over the 2·B image verdicts, Eq. 2 over B images.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mimkit.backbones import build_backbone
from mimkit.config import Config, method_options
from mimkit.discriminators import HierarchicalDiscriminator
from mimkit.losses import masked_mse
from mimkit.methods.base import Method, Stage, load_matching
from mimkit.methods.mae import MAEGenerator, MAEOptions, convert_mae_official
from mimkit.methods.simmim import SimMIM, SimMIMOptions, simmim_vit_to_timm
from mimkit.patches import mask_to_pixels, patchify, unpatchify


@dataclass
class VisionElectraOptions:
    generator: str = "mae"               # mae | simmim (Sec. 3.1)
    mask_ratio: float = 0.75             # Table 1: 75 % with the MAE generator (SimMIM: 0.6)
    noise_std: float = 0.1               # std of z~ (Sec. 3.2; the paper gives no value); 0 turns noise off
    gan_weight: float = 0.2              # lambda of Eq. 5
    patch_loss: bool = True              # Eq. 3 (Table 3 ablation)
    gan_loss: bool = True                # Eq. 2
    cls_loss: bool = True                # Eq. 4
    share_weights: bool = False          # Table 2: G's encoder is D's backbone
    generator_size: str | None = None    # Table 2 "smaller generator", e.g. small with a base D
    decoder_dim: int = 512               # MAE generator's decoder
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_patch_size: int = 32            # SimMIM generator's mask patch (pixels)
    patch_head_hidden: int | None = None  # CNN patch head width (default: D's width)
    generator_init: str | None = None    # continual pre-training: MAE/SimMIM checkpoint for G
    discriminator_init: str | None = None  # ... and an MAE/SimMIM/mimkit checkpoint for D's backbone


class VisionElectra(Method):
    """G and D trained jointly on Eq. 5 in one stage; two optimiser groups (generator, discriminator)."""

    options = VisionElectraOptions
    stages = (Stage("joint", ("generator", "discriminator")),)

    def __init__(self, cfg: Config, in_chans: int, opts: VisionElectraOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        if o.generator not in ("mae", "simmim"):
            raise ValueError(f"method.generator must be 'mae' or 'simmim', not {o.generator!r}")
        if o.share_weights and o.generator_size not in (None, cfg.model.size):
            raise ValueError("method.share_weights needs G and D of one size; unset method.generator_size")
        if cfg.model.arch == "swin" and o.generator == "mae":
            raise ValueError("a Swin discriminator needs method.generator=simmim (MAE's encoder drops tokens, "
                             "which Swin cannot)")
        d_backbone = build_backbone(cfg.model, in_chans, mask_token=o.share_weights and o.generator == "simmim")
        g_cfg = cfg if not o.generator_size else dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, size=o.generator_size, embed_dim=None, depth=None, num_heads=None))
        if o.generator == "mae":
            encoder = d_backbone if o.share_weights else build_backbone(g_cfg.model, in_chans, mask_token=False)
            self.generator = MAEGenerator(encoder, MAEOptions(o.mask_ratio, False, o.decoder_dim, o.decoder_depth,
                                                              o.decoder_heads))
        else:
            self.generator = SimMIM(g_cfg, in_chans, SimMIMOptions(o.mask_ratio, o.mask_patch_size))
            if o.share_weights:
                self.generator.backbone = d_backbone
        self.discriminator = HierarchicalDiscriminator(d_backbone, o.patch_head_hidden)
        self.patch_size, self.grid, self.in_chans = d_backbone.patch_size, d_backbone.grid, in_chans
        if self.generator_encoder.grid != self.grid:
            raise ValueError("G and D must share the patch grid; use the same model.patch_size for both")
        if o.generator_init:
            self.init_generator(o.generator_init)
        if o.discriminator_init:
            self.init_discriminator(o.discriminator_init)

    @property
    def encoder(self):
        return self.discriminator.backbone

    @property
    def generator_encoder(self):
        return self.generator.encoder

    def optim_groups(self):
        d_params = {id(p) for p in self.discriminator.parameters()}
        generator = [(n, p) for n, p in self.generator.named_parameters()
                     if p.requires_grad and id(p) not in d_params]  # a shared backbone is stepped once, with D
        discriminator = [(n, p) for n, p in self.discriminator.named_parameters() if p.requires_grad]
        return {"generator": generator, "discriminator": discriminator}

    # ------------------------------------------------------------------ generator
    def mask(self, images: torch.Tensor) -> torch.Tensor:
        return self.generator.mask(images)

    def generate(self, images: torch.Tensor, mask: torch.Tensor, noise_std: float) -> torch.Tensor:
        """G's predicted pixels for every patch [B, L, p*p*C], x^r = f(z + z~)."""
        if isinstance(self.generator, MAEGenerator):
            return self.generator(images, mask, latent_noise_std=noise_std)
        return patchify(self.generator.reconstruct(images, mask, latent_noise_std=noise_std), self.patch_size)

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor, noise_std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted patches, reconstructed image): original visible patches + generated masked patches."""
        real = patchify(images, self.patch_size)
        pred = self.generate(images, mask, noise_std)
        mixed = torch.where(mask.unsqueeze(-1), pred.to(real.dtype), real)
        return pred, unpatchify(mixed, self.patch_size, self.grid, self.in_chans)

    # ------------------------------------------------------------------ losses
    def forward(self, images: torch.Tensor, stage: str = "joint", carry: dict | None = None) -> dict:
        o = self.opts
        b = images.shape[0]
        mask = self.mask(images)                                                    # [B, L], True = generated
        pred, fake = self.reconstruct(images, mask, o.noise_std)
        loss_img = masked_mse(pred, patchify(images, self.patch_size), mask)        # Eq. 1

        # D on the original and the detached reconstruction, in one batch (Eq. 3-4 reach D only)
        patch_logits, image_logits = self.discriminator(torch.cat([images, fake.detach()]))
        patch_labels = torch.cat([torch.ones_like(mask, dtype=patch_logits.dtype), (~mask).to(patch_logits.dtype)])
        loss_patch = F.binary_cross_entropy_with_logits(patch_logits.float(), patch_labels.float())   # Eq. 3
        image_labels = torch.cat([torch.ones(b, device=images.device), torch.zeros(b, device=images.device)])
        loss_cls = F.binary_cross_entropy_with_logits(image_logits.float(), image_labels)             # Eq. 4

        total = loss_img
        parts = {"loss_img": loss_img, "loss_patch": loss_patch, "loss_cls": loss_cls}
        if o.gan_loss:
            parts["loss_gan"] = loss_gan = self.adversarial_loss(fake, mask)                          # Eq. 2
            total = total + o.gan_weight * loss_gan
        if o.patch_loss:
            total = total + loss_patch
        if o.cls_loss:
            total = total + loss_cls                                                                  # Eq. 5
        parts.update(self.discriminator_accuracy(patch_logits.detach(), image_logits.detach(), mask))
        return {"loss": total, "parts": parts}

    def adversarial_loss(self, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 2: -1/M sum_i log D(x_i^r) over the M generated patches - log D(x_0^r), through a D whose
        parameters are detached (its weights get no gradient; G gets all of it)."""
        frozen = {n: p.detach() for n, p in self.discriminator.named_parameters()}
        frozen.update(dict(self.discriminator.named_buffers()))
        patch_logits, image_logits = functional_call(self.discriminator, frozen, (fake,))
        per_patch = F.binary_cross_entropy_with_logits(patch_logits.float(), torch.ones_like(patch_logits.float()),
                                                       reduction="none")            # -log D(x_i^r)
        weight = mask.float()
        micro = (per_patch * weight).sum(1) / weight.sum(1).clamp(min=1)
        macro = F.binary_cross_entropy_with_logits(image_logits.float(), torch.ones_like(image_logits.float()),
                                                   reduction="none")                # -log D(x_0^r)
        return (micro + macro).mean()

    @staticmethod
    @torch.no_grad()
    def discriminator_accuracy(patch_logits, image_logits, mask) -> dict:
        b = mask.shape[0]
        generated = mask.float()
        return {
            "acc_patch_real": (patch_logits[:b] > 0).float().mean(),
            "acc_patch_fake": ((patch_logits[b:] < 0).float() * generated).sum() / generated.sum().clamp(min=1),
            "acc_img_real": (image_logits[:b] > 0).float().mean(),
            "acc_img_fake": (image_logits[b:] < 0).float().mean(),
        }

    # ------------------------------------------------------------------ pictures and weights
    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """original | masked | reconstruction | reconstruction with a second noise draw (Fig. 7)."""
        mask = self.mask(images)
        keep = 1 - mask_to_pixels(mask, self.patch_size, self.grid).to(images.dtype)
        first = self.reconstruct(images, mask, self.opts.noise_std)[1]
        second = self.reconstruct(images, mask, self.opts.noise_std)[1]
        return [("original", images), ("masked", images * keep), ("reconstruction", first),
                ("second noise draw", second)]

    def init_generator(self, path: str) -> None:
        """G from an MAE (official release or mimkit run) or SimMIM checkpoint."""
        from mimkit.engine.checkpoint import load_checkpoint, state_dict_of
        state = state_dict_of(load_checkpoint(path))
        if isinstance(self.generator, MAEGenerator):
            if any(k.startswith("generator.") for k in state):
                state = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
            else:
                own = {k: tuple(v.shape) for k, v in self.generator.state_dict().items()}
                state = convert_mae_official(state, own, prefix="")
        else:
            state = self.generator.convert_checkpoint(state)
        missing, _ = load_matching(self.generator, state, path)
        if len(missing) == len(self.generator.state_dict()):
            raise ValueError(f"no weight of {path} fits VE's generator; is it an MAE or SimMIM checkpoint?")

    def init_discriminator(self, path: str) -> None:
        """D's backbone from the encoder inside an MAE/SimMIM release or any mimkit run; heads stay fresh."""
        from mimkit.engine.checkpoint import load_checkpoint, state_dict_of
        encoder = encoder_state(state_dict_of(load_checkpoint(path)), self.encoder.grid)
        missing, _ = load_matching(self.encoder.model, encoder, path)
        if len(missing) == len(self.encoder.model.state_dict()):
            raise ValueError(f"no weight of {path} fits VE's discriminator backbone")


ENCODER_PREFIXES = ("discriminator.backbone.model.", "generator.encoder.model.", "backbone.model.", "encoder.model.")


def encoder_state(state: dict, grid: tuple[int, int]) -> dict:
    """timm ViT keys of the encoder inside any supported checkpoint (mimkit run, MAE or SimMIM release)."""
    for prefix in ENCODER_PREFIXES:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    if any(k.startswith("encoder.") for k in state):                                    # SimMIM release
        return simmim_vit_to_timm({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}, grid)
    skip = ("decoder", "mask_token", "head.", "fc_norm.")                               # MAE release
    return {k: v for k, v in state.items() if not k.startswith(skip)}
