"""CIM: Corrupted Image Modeling for Self-Supervised Visual Pre-Training (Fang et al.;
shared/papers/001_a38ff8dcabd66665.txt, Sec. 2, Appendix A.1, A.3, A.4; Tables 4-7, 13). No official code exists;
mimkit's is the reference, and every choice the paper leaves open is written here and is an option.

Status: ViT enhancer only. The ResNet enhancer, the MAE-style generator of Table 10 and the frozen-generator
variant of A.1 are not built yet (issue 11 stays open).

- Generator (Sec. 2.1, A.3 Eq. 1-2): `generators.BEiTGenerator`, a small vanilla ViT of the enhancer's width and
  `generator_depth` (4-6) blocks, trained on BEiT's loss: cross-entropy of the golden ids (the frozen tokenizer on
  the uncorrupted image) at the masked positions. Masking: `masking=random` (Eq. 1, the paper's default) or
  `block` (Table 4), `mask_ratio` 0.55 by default (the paper: 100-120 of 196 patches; 108 here).
- Corruption (Eq. 2): replacements sampled at every masked position (`sampling=softmax` at temperature 1, or
  `argmax` / `uniform`, Table 7); corrupted ids = golden ids with the samples at the masked positions; the frozen
  tokenizer decoder maps them to an image, resized to the enhancer's input (bilinear, antialiased) and normalised
  as the data. Sampling is discrete, so no enhancer gradient reaches the generator through the image.
- Sharing (Table 5 text): with `share_layers=2` (default) the generator's patch embedding and first two blocks
  *are* the enhancer's; both losses reach them. 0 turns it off.
- Enhancer (Sec. 2.2): a vanilla ViT (learnt 1-D positions, no layer scale, no drop path unless model.drop_path)
  with a linear head on every patch token.
  - RESPIX: predict the uncorrupted image at all pixels; loss l1 + l2 (means over pixels); target
    `respix_target=sliding_window` (each pixel standardised over the `window` x `window` neighbourhood,
    `targets.sliding_window_pixels`), `patch_norm` (MAE's), or `none` (Table 6).
  - REVDET: per-token BCE; label 1 iff the sampled token differs from the golden one (a sample equal to the golden
    id counts as original; visible positions are 0).
- Loss (Sec. 2.3, A.3, Table 13): one joint step, L = L_gen + w L_enh, w = 10 (RESPIX) or 1 (REVDET)
  (`enhancer_weight` overrides); two optimiser groups (`generator`, `enhancer`; shared layers in `enhancer`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.backbones import build_backbone
from mimkit.config import Config, method_options
from mimkit.engine.logging import RenderedRow
from mimkit.eval.attention import patch_overlay
from mimkit.generators import SAMPLING_MODES, BEiTGenerator, replaced_token_labels, sample_replacements
from mimkit.masking import beit_min_block, block_mask, random_mask
from mimkit.methods.base import Method, Stage
from mimkit.patches import mask_to_pixels, unpatchify
from mimkit.targets import patch_pixels, sliding_window_pixels, sliding_window_stats, unnormalize_patches

OBJECTIVES = ("respix", "revdet")
RESPIX_TARGETS = ("sliding_window", "patch_norm", "none")


@dataclass
class CIMOptions:
    objective: str = "respix"              # respix | revdet (Sec. 2.2)
    mask_ratio: float = 0.55               # 108 of 196 (the paper: 100-120)
    masking: str = "random"                # random (Eq. 1) | block (Table 4)
    sampling: str = "softmax"              # softmax (T = 1) | argmax | uniform (Table 7)
    generator_depth: int = 4               # 4-6 (Table 13)
    share_layers: int = 2                  # patch embedding + this many first blocks shared (Table 5 text); 0 = off
    enhancer_weight: float | None = None   # None: 10 for RESPIX, 1 for REVDET (Table 13)
    respix_target: str = "sliding_window"  # sliding_window | patch_norm | none (Table 6)
    window: int = 8                        # sliding-window size (Sec. 2.2)

    def __post_init__(self):   # checked when the config is read
        for key, allowed in (("objective", OBJECTIVES), ("masking", ("random", "block")), ("sampling", SAMPLING_MODES),
                             ("respix_target", RESPIX_TARGETS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"method.{key} must be one of {', '.join(allowed)}, not {getattr(self, key)!r}")
        if self.share_layers < 0 or self.share_layers > self.generator_depth:
            raise ValueError(f"method.share_layers={self.share_layers} is out of range: it must be in "
                             f"[0, method.generator_depth={self.generator_depth}]")
        if self.window < 2:
            raise ValueError(f"method.window={self.window} is out of range: it must be 2 or more")


class CIM(Method):
    options = CIMOptions
    stages = (Stage("joint", ("generator", "enhancer")),)

    def __init__(self, cfg: Config, in_chans: int, opts: CIMOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        if cfg.model.arch != "vit":
            raise ValueError("CIM's enhancer is a ViT here (model.arch=vit); the ResNet enhancer is not built yet")
        self.enhancer = build_backbone(cfg.model, in_chans, mask_token=False, sincos_pos=False)
        self.grid, self.patch_size, self.in_chans = self.enhancer.grid, self.enhancer.patch_size, in_chans
        tokenizer = self.attach_tokenizer(cfg, in_chans, self.grid)
        self.generator = BEiTGenerator(cfg.model, in_chans, tokenizer.vocab_size, o.generator_depth)
        for i in range(o.share_layers):   # the same modules, so one set of weights gets both losses
            self.generator.backbone.model.blocks[i] = self.enhancer.model.blocks[i]
        if o.share_layers:
            self.generator.backbone.model.patch_embed = self.enhancer.model.patch_embed
        out_dim = self.patch_size[0] * self.patch_size[1] * in_chans if o.objective == "respix" else 1
        self.head = nn.Linear(self.enhancer.embed_dim, out_dim)
        self.weight = o.enhancer_weight if o.enhancer_weight is not None else (10.0 if o.objective == "respix" else 1.0)

    @property
    def encoder(self):
        return self.enhancer

    def optim_groups(self):
        enhancer = {id(p) for p in self.enhancer.parameters()} | {id(p) for p in self.head.parameters()}
        return {"generator": [(n, p) for n, p in self.generator.named_parameters() if p.requires_grad and id(p) not in enhancer],
                "enhancer": [(n, p) for n, p in [*self.enhancer.named_parameters(prefix="enhancer"),
                                                 *self.head.named_parameters(prefix="head")] if p.requires_grad]}

    # ------------------------------------------------------------------ generator and corruption
    def mask(self, images: torch.Tensor) -> torch.Tensor:
        b, (gh, gw) = images.shape[0], self.grid
        if self.opts.masking == "block":
            return block_mask(b, self.grid, self.opts.mask_ratio, images.device, min_block=beit_min_block(gh * gw))
        return random_mask(b, self.grid, self.opts.mask_ratio, images.device, round(gh * gw * self.opts.mask_ratio))

    def corrupt(self, images: torch.Tensor, mask: torch.Tensor, golden: torch.Tensor | None = None) -> dict:
        """Generator logits, golden / corrupted ids [B, L] and the corrupted image (normalised as the data)."""
        golden = self.token_ids(images) if golden is None else golden
        logits = self.generator(images, mask)                                          # [B, L, V]
        sampled = sample_replacements(logits.detach(), self.opts.sampling)
        corrupted_ids = torch.where(mask, sampled, golden)
        return {"logits": logits, "golden": golden, "corrupted_ids": corrupted_ids,
                "corrupted": self.images_from_ids(corrupted_ids, images)}

    def enhance(self, corrupted: torch.Tensor) -> torch.Tensor:
        """Enhancer + linear head on every patch token -> [B, L, out]."""
        tokens = self.enhancer.model.forward_features(corrupted)[:, self.enhancer.num_prefix:]
        return self.head(tokens)

    def respix_target(self, images: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if o.respix_target == "sliding_window":
            return sliding_window_pixels(images, o.window)
        if o.respix_target == "patch_norm":
            return unpatchify(patch_pixels(images, self.patch_size, normalize=True), self.patch_size, self.grid, self.in_chans)
        return images.float()

    # ------------------------------------------------------------------ loss
    def forward(self, images: torch.Tensor, stage: str = "joint", carry: dict | None = None) -> dict:
        mask = self.mask(images)
        c = self.corrupt(images, mask)
        loss_gen = F.cross_entropy(c["logits"][mask].float(), c["golden"][mask])
        parts = {"loss_gen": loss_gen,
                 "gen_token_accuracy": (c["logits"].detach()[mask].argmax(-1) == c["golden"][mask]).float().mean()}
        out = self.enhance(c["corrupted"])
        if self.opts.objective == "respix":
            pred = unpatchify(out.float(), self.patch_size, self.grid, self.in_chans)
            diff = pred - self.respix_target(images)
            parts["loss_respix"] = loss_enh = diff.abs().mean() + diff.pow(2).mean()
        else:
            labels = replaced_token_labels(c["golden"], c["corrupted_ids"], mask)
            logits = out[..., 0].float()
            parts["loss_revdet"] = loss_enh = F.binary_cross_entropy_with_logits(logits, labels)
            parts["revdet_accuracy"] = ((logits.detach() > 0).float() == labels).float().mean()
            parts["revdet_all_original_accuracy"] = 1 - labels.mean()
        return {"loss": loss_gen + self.weight * loss_enh, "parts": parts}

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """original | masked | four corrupted images from the same masked input (Fig. 2) | enhancer output of the
        first: RESPIX un-normalised with the original's window statistics (A.1), REVDET P(replaced) per patch."""
        mask = self.mask(images)
        keep = 1 - mask_to_pixels(mask, self.patch_size, self.grid).to(images.dtype)
        golden = self.token_ids(images)
        draws = [self.corrupt(images, mask, golden) for _ in range(4)]
        rows = [("original", images), ("masked", images * keep)]
        rows += [(f"corrupted {i + 1}", d["corrupted"]) for i, d in enumerate(draws)]
        out = self.enhance(draws[0]["corrupted"])
        if self.opts.objective == "respix":
            rows.append(("enhancer output", self.display_respix(out, images)))
        else:
            p_replaced = torch.sigmoid(out[..., 0].float())
            rows.append(RenderedRow("P(replaced)", patch_overlay(self.to_pixels(draws[0]["corrupted"]), p_replaced, self.grid)))
        return rows

    def display_respix(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        pred = unpatchify(out.float(), self.patch_size, self.grid, self.in_chans)
        if self.opts.respix_target == "sliding_window":
            mean, var = sliding_window_stats(images, self.opts.window)
            return (pred * (var + 1e-6) ** 0.5 + mean).to(images.dtype)
        if self.opts.respix_target == "patch_norm":
            real = patch_pixels(images, self.patch_size)
            p = patch_pixels(pred, self.patch_size)
            p = unnormalize_patches(p, real)
            return unpatchify(p, self.patch_size, self.grid, self.in_chans).to(images.dtype)
        return pred.to(images.dtype)
