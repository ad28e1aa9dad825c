"""GAN-MAE: Masked Auto-Encoders Meet Generative Adversarial Networks and Beyond (Fei et al., CVPR 2023;
shared/papers/002_ef509a60956ce188.txt, a short summary: no code was released, so every choice it leaves open
is written here and is an option).

Parts (summary, "GAN-MAE Framework"):
- Generator: a standard MAE, H_v = f_e(X_v, M), X~_m = f_d(H_v, M); random masking, ratio 0.75.
- Discriminator: "identical to a ViT for classification" over the corrupted sequence X- = {X_v, X~_m} (original
  visible patches, generated masked ones), one binary verdict per token, D(X-, k) = p(y^k | X-, k): a ViT
  backbone with a linear head on every patch token (logit > 0 = original).
- Sharing (Algorithm 1 line 1, Table 3): by default the generator's encoder *is* D's backbone.

Losses (logits l, D = sigmoid(l); y^k = 1 for an original token, 0 for a generated one):
- L_mae = mean over masked patches of the per-patch mean squared error (MAE's reduction of the summary's
  sum_{k in M} ||x~^k - x^k||^2; a sum would tie the loss scale to the patch size and mask count).
- L_disc = mean over all N tokens of BCE(l^k, y^k) (the summary's sum over k, averaged likewise).
- L_adv as the summary writes it: log D(X_v) + log(1 - D(X~_m)), i.e. the log-likelihood D assigns to the
  right answer, which is exactly -L_disc. The generator *minimises* L_gen = L_mae + gamma L_adv, so it
  maximises D's loss: the minimax game of Goodfellow et al. (G minimises log(1 - D(G(z)))). Minimising
  log(1 - D(X~_m)) drives D's verdict on the generated patches to "original"; minimising log D(X_v) drives
  D's verdict on the true visible patches, which the generated ones surround in D's attention, to
  "generated". This is the only reading under which minimising L_gen fools D (the opposite sign would help
  D). `adversarial_loss=minimax` (default) is this; `nonsaturating` is the usual practical replacement,
  BCE against the flipped labels over all N tokens (-log D(X~_m) - log(1 - D(X_v))), whose gradient does not
  vanish when D wins. Both average over the N tokens as L_disc does. D's weights are detached in L_adv
  (`discriminators.forward_frozen`): it reaches the generator through the generated patches only.
- Adaptive gamma (the summary says "adaptive" and nothing more): VQGAN's balance (Esser et al. 2021, Eq. 7),
  gamma = gamma_base * clamp(||grad_w L_mae|| / (||grad_w L_adv|| + 1e-4), 0, gamma_max), w = the generator's
  last layer (the decoder's prediction weight), detached, clamped at VQGAN's 1e4. Base 0.1, measured: on the
  tiny Fashion-MNIST recipe (150 steps, batch 64) VQGAN's base 1.0 kept loss_mae above 1.3 (worse than
  predicting the mean) and D at the class prior (real accuracy 0), while 0.1 took loss_mae from 2.79 to 0.56
  and D to 0.86 / 0.99 accuracy on real / generated tokens. It costs one more backward pass through D per
  step. `gamma=<number>` fixes it instead. gamma is logged. Under torchrun the two gradients are averaged over the
  ranks first (a 2 x the last layer all-reduce), so gamma is the global batch's and a run is the same at any world
  size (with gradient accumulation it is each micro-batch's).
- D's prior phase at the shipped mask ratio (0.75; measured, tiny recipe at batch 64, 300 steps): from about step 11
  to 50 D answers "generated" for every token (acc_real 0.00, acc_fake 1.00: the 75 % class prior; balanced accuracy
  (acc_real + acc_fake) / 2 = 0.50), while the adaptive gamma falls from 1.0 (step 10) to 0.5 (30), 0.1 (50) and
  0.07 (60); D then learns the visible tokens (balanced 0.79 at step 60, 0.90 at 100, 0.97 at 300, gamma 0.01).
  `acc_balanced` is logged beside the two accuracies. No class-balanced D loss or D warm-up is offered: the phase
  is short next to a real run and the summary prescribes neither.
- Logged `loss` (and the progress line): L_mae, the generator's reconstruction loss, with D's balanced accuracy
  beside it; the sum L_mae + gamma L_adv + L_disc of objectives that pull against each other reads like nothing and
  is kept as `loss_sum_of_stages`.

What the generator predicts: raw patches in the data's normalisation (`norm_pix_loss` off), so that its
output is an image D can judge. With `norm_pix_loss=true` (MAE's best setting) the prediction is turned back
into pixels with each masked patch's true mean and std before D sees it: D then judges structure only,
and the true patch statistics leak into X-; an option, off by default.

Training schemes (Table 4), all as engine stages (the method never steps an optimiser):
- `adversarial` (Algorithm 1, default): per batch, a generator stage on L_gen (steps G and the shared
  backbone), then a discriminator stage on L_disc over X- built from that same step's generated patches,
  detached (steps D and the shared backbone). With sharing, the shared backbone gets L_mae and gamma L_adv
  (through G's path only) in the first stage and L_disc in the second, one optimiser stepped twice: two AdamW
  updates (and twice the weight decay) per iteration where `combined` makes one, so Table 4's rows differ in update
  count too. `backbone_update=once` keeps the generator stage's backbone gradients, adds D's stage's and steps the
  backbone once (`Stage.keep_grads`), the combined scheme's count in the adversarial order.
- `combined`: one stage, one loss L_gen + L_disc with the same detachments (as Vision ELECTRA trains).
- `two-stage`: plain MAE (L_mae only, D idle) for the first `two_stage_switch` share of the run, then
  `adversarial`.
Table 4's GPU-time column: every run logs `step_s` (mean seconds per step over the log interval, after the
log's device sync) and `train_hours`.

Which backbone is the result (Table 3): `encoder=shared` (sharing on; the default), or with
`share_weights=false` `encoder=generator` (MAE's encoder) or `encoder=discriminator` (D's backbone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mimkit.backbones import build_backbone
from mimkit.config import Config, method_options
from mimkit.discriminators import HierarchicalDiscriminator, forward_frozen
from mimkit.engine.dist import mean_over_ranks
from mimkit.engine.logging import RenderedRow
from mimkit.eval.attention import patch_overlay
from mimkit.losses import discriminator_loss, generator_loss, masked_mse
from mimkit.methods.base import Method, Stage
from mimkit.methods.mae import MAEGenerator, MAEOptions
from mimkit.patches import mask_to_pixels, patchify, unpatchify
from mimkit.targets import unnormalize_patches

SCHEMES = ("adversarial", "combined", "two-stage")
ENCODERS = ("shared", "generator", "discriminator")
GENERATOR_STAGE = Stage("generator", ("generator", "backbone"))
DISCRIMINATOR_STAGE = Stage("discriminator", ("discriminator", "backbone"))
JOINT_STAGE = Stage("joint", ("generator", "discriminator", "backbone"))
# backbone_update=once: the generator stage leaves the shared backbone's gradients for D's stage, which adds its own
# and steps the backbone once
GENERATOR_STAGE_ONCE = Stage("generator", ("generator",))
DISCRIMINATOR_STAGE_ONCE = Stage("discriminator", ("discriminator", "backbone"), keep_grads=("backbone",))


@dataclass
class GANMAEOptions:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False          # see the module docstring: raw patches, so that D judges an image
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    share_weights: bool = True           # Algorithm 1 line 1
    encoder: str | None = None           # shared | generator | discriminator (Table 3); None: by share_weights
    scheme: str = "adversarial"          # adversarial | combined | two-stage (Table 4)
    two_stage_switch: float = 0.5        # two-stage: share of the run trained as plain MAE
    adversarial_loss: str = "minimax"    # minimax (the summary's L_adv) | nonsaturating (flipped labels)
    gamma: str | float = "adaptive"      # adaptive (VQGAN's gradient-norm balance) | a fixed number
    gamma_base: float = 0.1              # measured (see the docstring); VQGAN uses 1.0
    gamma_max: float = 1.0e4
    backbone_update: str = "per_stage"   # per_stage (two AdamW updates of the shared backbone per step, adversarial
                                         # and two-stage schemes) | once (both stages' gradients, one update)

    def __post_init__(self):   # checked when the config is read
        check_options(self)


class GANMAE(Method):
    options = GANMAEOptions
    archs = ("vit",)
    stages = (GENERATOR_STAGE, DISCRIMINATOR_STAGE, JOINT_STAGE)   # every stage a scheme may run

    def __init__(self, cfg: Config, in_chans: int, opts: GANMAEOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        if o.encoder is None:
            o.encoder = cfg.method["encoder"] = "shared" if o.share_weights else "discriminator"
        d_backbone = build_backbone(cfg.model, in_chans, mask_token=False)
        g_encoder = d_backbone if o.share_weights else build_backbone(cfg.model, in_chans, mask_token=False)
        self.generator = MAEGenerator(g_encoder, MAEOptions(o.mask_ratio, o.norm_pix_loss, o.decoder_dim,
                                                            o.decoder_depth, o.decoder_heads))
        self.discriminator = HierarchicalDiscriminator(d_backbone, patch_head="linear", image_head=False)
        self.patch_size, self.grid, self.in_chans = d_backbone.patch_size, d_backbone.grid, in_chans
        self.stages = {"adversarial": (GENERATOR_STAGE, DISCRIMINATOR_STAGE), "combined": (JOINT_STAGE,),
                       "two-stage": (GENERATOR_STAGE, DISCRIMINATOR_STAGE)}[o.scheme]

    @property
    def encoder(self):
        return self.generator.encoder if self.opts.encoder == "generator" else self.discriminator.backbone

    def optim_groups(self):
        shared = {id(p) for p in self.discriminator.backbone.parameters()} if self.opts.share_weights else set()
        trainable = lambda module: [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # noqa: E731
        return {"generator": [(n, p) for n, p in trainable(self.generator) if id(p) not in shared],
                "discriminator": [(n, p) for n, p in trainable(self.discriminator) if id(p) not in shared],
                "backbone": trainable(self.discriminator.backbone) if self.opts.share_weights else []}

    def adversarial_from(self, step: int, total_steps: int) -> bool:
        """Whether the adversarial terms run at this step (always, except in a two-stage run's MAE part)."""
        return self.opts.scheme != "two-stage" or step >= round(self.opts.two_stage_switch * total_steps)

    def schedule(self, step: int, epoch: int, total_steps: int) -> tuple[Stage, ...]:
        if not self.adversarial_from(step, total_steps):
            return (GENERATOR_STAGE,)
        if self.opts.backbone_update == "once" and self.stages == (GENERATOR_STAGE, DISCRIMINATOR_STAGE):
            return (GENERATOR_STAGE_ONCE, DISCRIMINATOR_STAGE_ONCE)
        return self.stages

    def cost_points(self, total_steps: int) -> list[tuple[int, int, float]]:
        """Two-stage: the plain MAE part, then the adversarial part, each for its share of the steps."""
        if self.opts.scheme != "two-stage":
            return super().cost_points(total_steps)
        switch = round(self.opts.two_stage_switch * total_steps)
        return [(0, 1, switch / total_steps), (total_steps - 1, 1, 1 - switch / total_steps)]

    # ------------------------------------------------------------------ generator and corrupted image
    def corrupt(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask [B, L] True = generated, prediction in the loss's space [B, L, p*p*C], corrupted image X-)."""
        mask = self.generator.mask(images)
        pred = self.generator(images, mask)
        real = patchify(images, self.patch_size)
        fake = pred
        if self.opts.norm_pix_loss:   # back to pixels with the true patches' statistics (see the docstring)
            fake = unnormalize_patches(pred, real)
        mixed = torch.where(mask.unsqueeze(-1), fake.to(real.dtype), real)
        return mask, pred, unpatchify(mixed, self.patch_size, self.grid, self.in_chans)

    def adversarial_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_adv over all N tokens (labels 1 = original, 0 = generated), minimised by the generator."""
        labels = (~mask).float()
        if self.opts.adversarial_loss == "minimax":
            return -discriminator_loss(logits, labels)             # log D(X_v) + log(1 - D(X~_m)), averaged
        return generator_loss(torch.where(mask, logits, -logits))  # -log D(X~_m) - log(1 - D(X_v)), averaged

    def adaptive_gamma(self, loss_mae: torch.Tensor, loss_adv: torch.Tensor) -> torch.Tensor:
        """gamma_base * clamp(||grad L_mae|| / (||grad L_adv|| + 1e-4), 0, gamma_max) at the generator's last layer."""
        o = self.opts
        if o.gamma != "adaptive":
            return torch.tensor(float(o.gamma), device=loss_mae.device)
        last = self.generator.decoder_pred.weight
        g_mae = torch.autograd.grad(loss_mae, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(loss_adv, last, retain_graph=True)[0]
        # the gradients of the losses over every rank's images (their mean), so gamma is the global batch's
        g_mae, g_adv = mean_over_ranks(torch.stack([g_mae.float(), g_adv.float()]))
        ratio = g_mae.norm() / (g_adv.norm() + 1e-4)
        return (o.gamma_base * ratio.clamp(0, o.gamma_max)).detach()

    # ------------------------------------------------------------------ stages
    def forward(self, images: torch.Tensor, stage: str = "generator", carry: dict | None = None) -> dict:
        carry = carry if carry is not None else {}
        adversarial = self.adversarial_from(carry.get("step", 0), carry.get("total_steps", 1))
        if stage == "discriminator":
            return self.discriminator_stage(carry)
        out = self.generator_stage(images, carry, adversarial)
        if stage == "joint":
            d_out = self.discriminator_stage(carry)
            out = {"loss": out["loss"] + d_out["loss"], "parts": {**out["parts"], **d_out["parts"]}}
        return out

    def generator_stage(self, images: torch.Tensor, carry: dict, adversarial: bool = True) -> dict:
        """L_gen = L_mae + gamma L_adv; leaves the mask and the detached corrupted image for D's stage."""
        mask, pred, corrupted = self.corrupt(images)
        carry["mask"], carry["corrupted"] = mask, corrupted.detach()
        loss_mae = masked_mse(pred, self.generator.target(images), mask)
        parts = {"loss_mae": loss_mae}
        if not adversarial:
            return {"loss": loss_mae, "parts": parts}
        logits, _ = forward_frozen(self.discriminator, corrupted)
        loss_adv = self.adversarial_loss(logits, mask)
        gamma = self.adaptive_gamma(loss_mae, loss_adv)
        parts.update(loss_adv=loss_adv, gamma=gamma)
        return {"loss": loss_mae + gamma * loss_adv, "parts": parts}

    def discriminator_stage(self, carry: dict) -> dict:
        """L_disc: per-token BCE over all N tokens of X- (labels 1 = original, 0 = generated)."""
        mask = carry["mask"]
        logits, _ = self.discriminator(carry["corrupted"])
        loss_disc = discriminator_loss(logits, (~mask).float())
        return {"loss": loss_disc, "parts": {"loss_disc": loss_disc, **token_accuracy(logits.detach(), mask)}}

    @classmethod
    def inert_options(cls, o) -> list[tuple[str, str]]:
        rules = [("two_stage_switch", o.scheme != "two-stage", "outside method.scheme=two-stage"),
                 ("gamma_base", o.gamma != "adaptive", "with a fixed method.gamma (it scales the adaptive one)"),
                 ("gamma_max", o.gamma != "adaptive", "with a fixed method.gamma (it clamps the adaptive one)"),
                 ("backbone_update", o.scheme == "combined", "with method.scheme=combined (one stage: one update)"),
                 ("backbone_update", not o.share_weights, "without a shared backbone (method.share_weights=false)")]
        return [(key, why) for key, inert, why in rules if inert]

    def headline(self, row: dict) -> dict[str, float]:
        """`loss` = the generator's reconstruction loss L_mae (the sum L_mae + gamma L_adv + L_disc adds objectives
        that pull against each other), and D's balanced accuracy beside it."""
        def first(name: str):
            return next((row[k] for k in (f"generator/{name}", f"joint/{name}", f"discriminator/{name}", name)
                         if k in row), None)
        shown = {"loss_mae": first("loss_mae")}
        if first("acc_balanced") is not None:
            shown["acc_balanced"] = first("acc_balanced")
        return shown

    # ------------------------------------------------------------------ pictures and weights
    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """original | masked | reconstruction (X-) | D's verdict: P(generated) per patch over X- (Fig. 3)."""
        mask, _, corrupted = self.corrupt(images)
        keep = 1 - mask_to_pixels(mask, self.patch_size, self.grid).to(images.dtype)
        logits, _ = self.discriminator(corrupted)
        verdict = patch_overlay(self.to_pixels(corrupted), torch.sigmoid(-logits.float()), self.grid)
        return [("original", images), ("masked", images * keep), ("reconstruction", corrupted),
                RenderedRow("D: P(generated)", verdict)]

    def pretrained_parts(self, state_dict: dict) -> list:
        """`--init FILE`: the generator (MAE release or any mimkit run: encoder required, decoder if present) and,
        without sharing, D's backbone from the same encoder."""
        from mimkit.pretrained import Part, encoder_state, mae_generator_parts
        parts = mae_generator_parts(self.generator, state_dict, decoder_required=False)
        if not self.opts.share_weights:
            backbone = self.discriminator.backbone
            parts.append(Part("discriminator encoder", backbone, encoder_state(state_dict, backbone)))
        return parts


def check_options(o: GANMAEOptions) -> None:
    if o.scheme not in SCHEMES:
        raise ValueError(f"method.scheme must be one of {', '.join(SCHEMES)}, not {o.scheme!r}")
    if o.encoder is not None and o.encoder not in ENCODERS:
        raise ValueError(f"method.encoder must be one of {', '.join(ENCODERS)}, not {o.encoder!r}")
    if o.share_weights and o.encoder not in (None, "shared"):
        raise ValueError(f"method.encoder={o.encoder} names one of two backbones, but method.share_weights=true makes "
                         f"them one; set method.share_weights=false (Table 3's unshared rows) or method.encoder=shared")
    if not o.share_weights and o.encoder == "shared":
        raise ValueError("method.encoder=shared needs method.share_weights=true")
    if o.adversarial_loss not in ("minimax", "nonsaturating"):
        raise ValueError(f"method.adversarial_loss must be minimax or nonsaturating, not {o.adversarial_loss!r}")
    if o.gamma != "adaptive":
        try:
            value = float(o.gamma)
        except (TypeError, ValueError):
            raise ValueError(f"method.gamma must be adaptive or a number >= 0, not {o.gamma!r}") from None
        if value < 0:
            raise ValueError(f"method.gamma={value} is out of range: it must be >= 0")
    if not 0 <= o.two_stage_switch <= 1:
        raise ValueError(f"method.two_stage_switch={o.two_stage_switch} is out of range: it must be in [0, 1]")
    if o.gamma_base < 0 or o.gamma_max <= 0:
        raise ValueError("method.gamma_base must be >= 0 and method.gamma_max > 0")


@torch.no_grad()
def token_accuracy(logits: torch.Tensor, mask: torch.Tensor) -> dict:
    """D's per-token accuracy on the original (visible) tokens, on the generated (masked) ones, and their mean, the
    balanced accuracy (0.5 for a D that answers the class prior, "generated" everywhere at mask 0.75)."""
    generated = mask.float()
    real = ((logits > 0).float() * (1 - generated)).sum() / (1 - generated).sum().clamp(min=1)
    fake = ((logits < 0).float() * generated).sum() / generated.sum().clamp(min=1)
    return {"acc_real": real, "acc_fake": fake, "acc_balanced": (real + fake) / 2}
