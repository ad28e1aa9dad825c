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

Table 3 ablations: "w/o patch loss" removes patch-level discrimination altogether (Sec. 4.3: D "solely
appraises the overall image authenticity"): no CNN patch head, no Eq. 3, and Eq. 2 keeps only its macro
term; "w/o CLS loss" likewise removes the image head, Eq. 4 and Eq. 2's macro term. A term that is off is
neither computed nor logged. The GAN terms are the non-saturating losses of `losses.gan`.

Continual pre-training (Table 1 "Official + 50ep"): `generator_init` loads G's encoder and decoder,
`discriminator_init` D's backbone (heads stay fresh), each with a per-module count; D follows a SimMIM
file's layer scale (`discriminator_layer_scale=auto`) and keeps its learnt position table learnt. With
`model.position=shared_relative` D is SimMIM's own ViT (one relative position bias shared by all blocks, timm's Beit
blocks), so SimMIM's ViT release loads as the paper's continual pre-training does; the MAE generator's encoder keeps
absolute positions (it encodes the visible patches only), and its relative bias table gets no weight decay
(SimMIM's exemption).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mimkit.backbones import build_backbone
from mimkit.config import Config, method_options
from mimkit.discriminators import HierarchicalDiscriminator, forward_frozen
from mimkit.losses import discriminator_loss, generator_loss, masked_mse
from mimkit.methods.base import Method, Stage
from mimkit.methods.mae import MAEGenerator, MAEOptions
from mimkit.methods.simmim import SimMIM, SimMIMOptions
from mimkit.patches import mask_to_pixels, patchify, unpatchify


@dataclass
class VisionElectraOptions:
    generator: str = "mae"               # mae | simmim (Sec. 3.1)
    mask_ratio: float | None = None      # None: the generator's own (MAE 0.75 as Table 1, SimMIM 0.6)
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
    discriminator_layer_scale: str | float | None = "auto"  # D's layer scale; auto: as discriminator_init's file


class VisionElectra(Method):
    """G and D trained jointly on Eq. 5 in one stage; two optimiser groups (generator, discriminator)."""

    options = VisionElectraOptions
    relative_positions = True                  # D may be SimMIM's own ViT (model.position=shared_relative)
    no_weight_decay_keys = ("relative_position_bias_table",)   # SimMIM's exemption, for a D started from SimMIM
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
        if cfg.model.position != "absolute" and o.generator == "mae" and o.share_weights:
            raise ValueError("method.share_weights with the MAE generator needs model.position=absolute (MAE's encoder "
                             "drops tokens, which a shared relative position bias cannot); unset one of them")
        if not (o.patch_loss or o.cls_loss):
            raise ValueError("method.patch_loss and method.cls_loss are both off, so the discriminator has nothing to "
                             "learn; keep at least one of them")
        if o.mask_ratio is None:
            o.mask_ratio = 0.75 if o.generator == "mae" else 0.6
        if isinstance(o.discriminator_layer_scale, str) and o.discriminator_layer_scale != "auto":
            raise ValueError(f"method.discriminator_layer_scale must be auto, null or a number, not "
                             f"{o.discriminator_layer_scale!r}")
        if o.discriminator_layer_scale == "auto":   # resolved once and recorded, so a resumed run needs no file
            o.discriminator_layer_scale = cfg.method["discriminator_layer_scale"] = \
                file_layer_scale(o.discriminator_init) if o.discriminator_init else None
        d_backbone = build_backbone(cfg.model, in_chans, mask_token=o.share_weights and o.generator == "simmim",
                                    init_values=o.discriminator_layer_scale)
        g_cfg = cfg if not o.generator_size else dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, size=o.generator_size, embed_dim=None, depth=None, num_heads=None))
        if o.generator == "mae":   # MAE's encoder sees the visible patches only: absolute positions whatever D uses
            g_model = dataclasses.replace(g_cfg.model, position="absolute")
            encoder = d_backbone if o.share_weights else build_backbone(g_model, in_chans, mask_token=False)
            self.generator = MAEGenerator(encoder, MAEOptions(o.mask_ratio, False, o.decoder_dim, o.decoder_depth,
                                                              o.decoder_heads))
        else:
            self.generator = SimMIM(g_cfg, in_chans, SimMIMOptions(o.mask_ratio, o.mask_patch_size))
            if o.share_weights:
                self.generator.backbone = d_backbone
        self.discriminator = HierarchicalDiscriminator(d_backbone, o.patch_head_hidden, patch_head=o.patch_loss,
                                                       image_head=o.cls_loss)
        self.patch_size, self.grid, self.in_chans = d_backbone.patch_size, d_backbone.grid, in_chans
        if self.generator_encoder.grid != self.grid:
            raise ValueError("G and D must share the patch grid; use the same model.patch_size for both")

    @classmethod
    def inert_options(cls, o) -> list[tuple[str, str]]:
        rules = [("mask_patch_size", o.generator == "mae", "with the MAE generator (it masks whole patches)"),
                 ("gan_weight", not o.gan_loss, "with method.gan_loss=false"),
                 ("patch_head_hidden", not o.patch_loss, "with method.patch_loss=false (no patch head)"),
                 ("decoder_dim", o.generator == "simmim", "with the SimMIM generator (a one-layer head)"),
                 ("decoder_depth", o.generator == "simmim", "with the SimMIM generator (a one-layer head)"),
                 ("decoder_heads", o.generator == "simmim", "with the SimMIM generator (a one-layer head)")]
        return [(key, why) for key, inert, why in rules if inert]

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
    def val_headline(self, row: dict) -> dict[str, float]:
        """Held-out `val/loss` = Eq. 1's reconstruction loss (the adversarial and D terms move with D)."""
        return {"loss_img": row["loss_img"]}

    def forward(self, images: torch.Tensor, stage: str = "joint", carry: dict | None = None) -> dict:
        o = self.opts
        b = images.shape[0]
        mask = self.mask(images)                                                    # [B, L], True = generated
        pred, fake = self.reconstruct(images, mask, o.noise_std)
        loss_img = masked_mse(pred, patchify(images, self.patch_size), mask)        # Eq. 1
        total, parts = loss_img, {"loss_img": loss_img}

        # D on the original and the detached reconstruction, in one batch (Eq. 3-4 reach D only)
        patch_logits, image_logits = self.discriminator(torch.cat([images, fake.detach()]))
        if patch_logits is not None:
            patch_labels = torch.cat([torch.ones_like(mask), ~mask]).float()       # visible patches are originals
            parts["loss_patch"] = loss_patch = discriminator_loss(patch_logits, patch_labels)        # Eq. 3
            total = total + loss_patch
            parts.update(patch_accuracy(patch_logits.detach(), mask))
        if image_logits is not None:
            image_labels = torch.cat([torch.ones(b, device=images.device), torch.zeros(b, device=images.device)])
            parts["loss_cls"] = loss_cls = discriminator_loss(image_logits, image_labels)            # Eq. 4
            total = total + loss_cls
            parts.update(image_accuracy(image_logits.detach()))
        if o.gan_loss:
            parts["loss_gan"] = loss_gan = self.adversarial_loss(fake, mask)                          # Eq. 2
            total = total + o.gan_weight * loss_gan                                                   # Eq. 5
        return {"loss": total, "parts": parts}

    def adversarial_loss(self, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 2: -1/M sum_i log D(x_i^r) over the M generated patches - log D(x_0^r), through a D whose
        parameters are detached (its weights get no gradient; G gets all of it). A level whose head is off
        (Table 3) drops its term."""
        patch_logits, image_logits = forward_frozen(self.discriminator, fake)
        per_image = torch.zeros(fake.shape[0], device=fake.device)
        if patch_logits is not None:
            weight = mask.float()
            per_patch = generator_loss(patch_logits, reduction="none")              # -log D(x_i^r)
            per_image = per_image + (per_patch * weight).sum(1) / weight.sum(1).clamp(min=1)
        if image_logits is not None:
            per_image = per_image + generator_loss(image_logits, reduction="none")  # -log D(x_0^r)
        return per_image.mean()

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

    def pretrained_parts(self, state_dict: dict) -> list:
        """`--init FILE`: D's backbone from any supported checkpoint; from a Vision ELECTRA run also D's heads
        and the generator (a continued VE run)."""
        from mimkit.pretrained import Part, encoder_state, strip_prefix
        parts = [Part("discriminator encoder", self.encoder, encoder_state(state_dict, self.encoder))]
        if any(k.startswith("discriminator.") for k in state_dict) and any(k.startswith("generator.") for k in state_dict):
            heads = {k: v for k, v in strip_prefix(state_dict, "discriminator.").items()
                     if k.startswith(("patch_head.", "image_head."))}
            parts.append(Part("discriminator heads", self.discriminator, heads, required=False,
                              prefixes=("patch_head.", "image_head.")))
            parts += self.generator_parts(state_dict, required=False)
        return parts

    def generator_parts(self, state_dict: dict, required: bool) -> list:
        from mimkit.pretrained import mae_generator_parts
        if isinstance(self.generator, MAEGenerator):
            parts = mae_generator_parts(self.generator, state_dict, decoder_required=required)
        else:
            parts = self.generator.pretrained_parts(state_dict)
        for part in parts:
            part.name, part.required = f"generator {part.name}", required and part.required
        return parts

    def load_initial_weights(self) -> list[str]:
        """Continual pre-training: G from an MAE/SimMIM checkpoint (encoder and, for MAE, decoder required),
        D's backbone from an MAE/SimMIM/mimkit checkpoint; D's heads stay at their init."""
        from mimkit.engine.checkpoint import load_checkpoint, state_dict_of
        from mimkit.pretrained import Part, encoder_state, load_parts
        o, lines = self.opts, []
        if o.generator_init:
            state = state_dict_of(load_checkpoint(o.generator_init))
            lines.append(load_parts(self.generator_parts(state, required=True), f"method.generator_init={o.generator_init}"))
        if o.discriminator_init:
            state = state_dict_of(load_checkpoint(o.discriminator_init))
            part = Part("discriminator encoder", self.encoder, encoder_state(state, self.encoder))
            lines.append(load_parts([part], f"method.discriminator_init={o.discriminator_init}")
                         + "; discriminator heads: fresh")
        return lines


@torch.no_grad()
def patch_accuracy(patch_logits: torch.Tensor, mask: torch.Tensor) -> dict:
    """D's accuracy on each kind of patch Eq. 3 labels: the original image's (real), the reconstructed image's visible
    ones (real too, and the hard ones: the same pixels beside generated neighbours) and its generated ones (fake)."""
    b = mask.shape[0]
    generated, kept = mask.float(), (~mask).float()
    on_reconstruction = patch_logits[b:]
    return {"acc_patch_original": (patch_logits[:b] > 0).float().mean(),
            "acc_patch_visible_in_reconstruction": ((on_reconstruction > 0).float() * kept).sum() / kept.sum().clamp(min=1),
            "acc_patch_generated": ((on_reconstruction < 0).float() * generated).sum() / generated.sum().clamp(min=1)}


@torch.no_grad()
def image_accuracy(image_logits: torch.Tensor) -> dict:
    b = image_logits.shape[0] // 2
    return {"acc_img_original": (image_logits[:b] > 0).float().mean(),
            "acc_img_reconstructed": (image_logits[b:] < 0).float().mean()}


def file_layer_scale(path: str) -> float | None:
    """0.1 (SimMIM's value; the loaded gammas replace it) when the file's encoder has layer scale, else None."""
    from mimkit.engine.checkpoint import load_checkpoint, state_dict_of
    state = state_dict_of(load_checkpoint(path))
    return 0.1 if any(k.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")) for k in state) else None
