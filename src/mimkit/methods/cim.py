"""CIM: Corrupted Image Modeling for Self-Supervised Visual Pre-Training (Fang et al.;
shared/papers/001_a38ff8dcabd66665.txt, Sec. 2, Appendix A.1, A.3, A.4; Tables 4-7, 10, 13). No official code exists;
mimkit's is the reference, and every choice the paper leaves open is written here and is an option.

- Generator (Sec. 2.1, A.3 Eq. 1-2): `generators.BEiTGenerator`, a small vanilla ViT of `generator_depth` (4-6)
  blocks, as wide as a ViT enhancer or 384 wide for a ResNet enhancer (Table 13; `generator_width`,
  `generator_heads` override), trained on BEiT's loss: cross-entropy of the golden ids (the frozen tokenizer on the
  uncorrupted image) at the masked positions. Its patch grid is the tokenizer's token grid: the ViT enhancer's
  patch grid, or with a ResNet enhancer the grid `model.patch_size` declares (224 / 16 = 14x14, Table 13). The
  tokenizer is fed the size giving that grid (`tokenizer.input_size`; DALL-E's: 112 px, "following BEiT"). Masking: `masking=random` (Eq. 1, the paper's default) or
  `block` (Table 4), `mask_ratio` 0.55 by default (the paper: 100-120 of 196 patches; 108 here).
- Corruption (Eq. 2): replacements sampled at every masked position (`sampling=softmax` at temperature 1, or
  `argmax` / `uniform`, Table 7); corrupted ids = golden ids with the samples at the masked positions; the frozen
  tokenizer decoder maps them to an image, resized to the enhancer's input (bilinear, antialiased) and normalised
  as the data. Sampling is discrete, so no enhancer gradient reaches the generator through the image.
- `generator=mae` (Table 10): an MAE (encoder of the generator's width and depth on the visible patches,
  `mae_decoder_depth` decoder blocks, `mae_decoder_dim` wide: Table 10's MAE-Base generator is a 768-wide,
  12-block encoder with MAE's 512-wide decoder) whose decoder predicts, for every pixel value, logits over `rgb_bins` evenly
  spaced levels of [0, 1]; trained by cross-entropy against the original's levels at the masked patches and sampled
  there as above. The paper only says it "samples RGB color values at all masked positions of the MAE decoder
  outputs"; a categorical over levels is mimkit's reading (a regression output has nothing to sample). The
  corrupted image is the level-quantised original with the sampled levels at the masked patches (the whole image
  quantised, so quantisation alone does not tell the enhancer where the mask was). No tokenizer is needed; a patch
  counts as replaced for REVDET iff any of its sampled levels differs from the original's.
- Sharing (Table 5 text): with a ViT enhancer and the BEiT generator, `share_layers` (default 2) makes the
  generator's patch embedding and first blocks *be* the enhancer's; both losses reach them. 0 turns it off; a
  ResNet enhancer, the MAE-style generator and the frozen generator share nothing.
- Enhancer (Sec. 2.2): a vanilla ViT (learnt 1-D positions, no layer scale, no drop path unless model.drop_path),
  or a ResNet (`model.arch=resnet`, timm's ResNet-50 = torchvision's, unchanged; `model.output_stride` 16/8 dilates
  its last stages for small inputs), with a linear head on every patch token / feature-map cell.
  - RESPIX: predict the uncorrupted image at all pixels; loss l1 + l2 (means over pixels); target
    `respix_target=sliding_window` (each pixel standardised over the `window` x `window` neighbourhood,
    `targets.sliding_window_pixels`), `patch_norm` (MAE's), or `none` (Table 6). A ResNet cell predicts the
    stride x stride pixels it covers (a 1x1 conv + pixel shuffle, as SimMIM's CNN head).
  - REVDET: per-token BCE; label 1 iff the sampled token differs from the golden one (a sample equal to the golden
    id counts as original; visible positions are 0). The paper does not say how a ResNet's final map (7x7 at
    224 px) meets the 14x14 token grid: here each cell predicts the r x r tokens it covers (a linear head to r^2
    logits + pixel shuffle, r = token grid / map size); a map finer than the grid is average-pooled onto it.
- Loss (Sec. 2.3, A.3, Table 13): one joint step, L = L_gen + w L_enh, w = 10 (RESPIX) or 1 (REVDET)
  (`enhancer_weight` overrides); two optimiser groups (`generator`, `enhancer`; shared layers in `enhancer`).
- `generator_training=pretrain_then_freeze` (A.1): the first `generator_pretrain_share` of the steps train only the
  generator (L_gen), the rest only the enhancer against the fixed generator (A.1: 300 + 300 epochs, so 0.5); each
  is its own run for the lr: its own warm-up (optim.warmup_epochs) and cosine decay over its part (`group_steps`).
- Gradient clipping (Table 13: 3.0): one global norm over every parameter the step updates, generator and enhancer
  together, as BEiT's code that CIM builds on (`clip_scope = "stage"`; `optim.clip_scope=group` clips each group).
- Data (A.4.1): Table 13 says "RandomResizedCrop only" while Sec. 3 says "cropping and flipping"; the recipes follow
  Table 13 (data.hflip=false); flipping is one key away.
- Weight decay and init (no official code; CIM builds on BEiT's): no decay on `pos_embed` and `cls_token` (BEiT's
  `no_weight_decay`) besides biases and norms; the BEiT generator's mask token decays, as in BEiT. The ViT enhancer
  keeps timm's ViT init (BEiT's trunc-normal 0.02 family); the ResNet-50 is torchvision's as the paper names it,
  so its blocks' last BatchNorm starts at 1, not at timm's 0 (`model.zero_init_last=true` for timm's).
- A ResNet's BatchNorm statistics are per device (no SyncBatchNorm), as in the paper's BEiT-based code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.backbones import ViTBackbone, build_backbone
from mimkit.config import Config, method_options
from mimkit.engine.logging import RenderedRow
from mimkit.eval.attention import patch_overlay
from mimkit.generators import SAMPLING_MODES, BEiTGenerator, replaced_token_labels, sample_replacements
from mimkit.masking import beit_min_block, block_mask, random_mask
from mimkit.methods.base import Method, Stage
from mimkit.methods.mae import MAEGenerator, MAEOptions
from mimkit.patches import mask_to_pixels, patchify, unpatchify
from mimkit.targets import patch_pixels, sliding_window_pixels, sliding_window_stats, unnormalize_patches

OBJECTIVES = ("respix", "revdet")
RESPIX_TARGETS = ("sliding_window", "patch_norm", "none")
GENERATORS = ("beit", "mae")
GENERATOR_TRAINING = ("joint", "pretrain_then_freeze")
JOINT, GENERATOR_ONLY, ENHANCER_ONLY = (Stage("joint", ("generator", "enhancer")), Stage("generator", ("generator",)),
                                        Stage("enhancer", ("enhancer",)))


@dataclass
class CIMOptions:
    objective: str = "respix"              # respix | revdet (Sec. 2.2)
    mask_ratio: float = 0.55               # 108 of 196 (the paper: 100-120)
    masking: str = "random"                # random (Eq. 1) | block (Table 4)
    sampling: str = "softmax"              # softmax (T = 1) | argmax | uniform (Table 7)
    generator: str = "beit"                # beit (Sec. 2.1) | mae (Table 10: RGB levels sampled at masked patches)
    generator_depth: int = 4               # 4-6 (Table 13)
    generator_width: int | None = None     # None: the ViT enhancer's width, 384 with a ResNet (Table 13)
    generator_heads: int | None = None     # None: the ViT enhancer's heads, width / 64 with a ResNet
    share_layers: int | None = None        # patch embedding + this many first blocks shared (Table 5 text);
    #                                        None: 2 where sharing is possible (ViT enhancer, BEiT generator), else 0
    mae_decoder_depth: int = 2             # generator=mae: decoder blocks
    mae_decoder_dim: int | None = None     # generator=mae: decoder width (None: the generator's; Table 10's MAE-Base
                                           # generator: 768-wide encoder, MAE's 512-wide decoder)
    mae_decoder_heads: int | None = None   # generator=mae: decoder heads (None: the generator's)
    rgb_bins: int = 16                     # generator=mae: levels per pixel value it predicts and samples
    generator_training: str = "joint"      # joint (Sec. 2.3) | pretrain_then_freeze (A.1)
    generator_pretrain_share: float = 0.5  # pretrain_then_freeze: share of the steps that train only the generator
    enhancer_weight: float | None = None   # None: 10 for RESPIX, 1 for REVDET (Table 13)
    respix_target: str = "sliding_window"  # sliding_window | patch_norm | none (Table 6)
    window: int = 8                        # sliding-window size (Sec. 2.2)

    def __post_init__(self):   # checked when the config is read
        for key, allowed in (("objective", OBJECTIVES), ("masking", ("random", "block")), ("sampling", SAMPLING_MODES),
                             ("respix_target", RESPIX_TARGETS), ("generator", GENERATORS),
                             ("generator_training", GENERATOR_TRAINING)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"method.{key} must be one of {', '.join(allowed)}, not {getattr(self, key)!r}")
        for key, low in (("generator_depth", 1), ("generator_width", 8), ("generator_heads", 1),
                         ("mae_decoder_depth", 1), ("rgb_bins", 2), ("window", 2), ("mae_decoder_dim", 1),
                         ("mae_decoder_heads", 1)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise ValueError(f"method.{key}={value} is out of range: it must be {low} or more")
        if self.share_layers is not None and not 0 <= self.share_layers <= self.generator_depth:
            raise ValueError(f"method.share_layers={self.share_layers} is out of range: it must be in "
                             f"[0, method.generator_depth={self.generator_depth}]")
        if not 0 < self.generator_pretrain_share < 1:
            raise ValueError(f"method.generator_pretrain_share={self.generator_pretrain_share} is out of range: it "
                             f"must be in (0, 1)")
        if self.generator == "mae" and self.masking != "random":
            raise ValueError("method.generator=mae needs method.masking=random (its encoder drops a fixed number of "
                             "patches)")
        if self.shared_layers("vit") and self.generator_training != "joint":
            raise ValueError("a generator frozen after pre-training (method.generator_training=pretrain_then_freeze) "
                             "cannot share layers with the enhancer that keeps training; set method.share_layers=0")

    def shared_layers(self, arch: str) -> int:
        """How many generator blocks (with the patch embedding) are the enhancer's."""
        if arch != "vit" or self.generator != "beit":
            return 0
        if self.share_layers is None:
            return 2 if self.generator_training == "joint" else 0
        return self.share_layers


class CIM(Method):
    options = CIMOptions
    archs = ("vit", "resnet")
    clip_scope = "stage"        # BEiT-style code: one global norm over every parameter the step updates
    no_weight_decay_keys = ("pos_embed", "cls_token")   # BEiT's no_weight_decay (besides biases and norms)
    stages = (JOINT, GENERATOR_ONLY, ENHANCER_ONLY)   # every stage the schedule may run

    @classmethod
    def check_config(cls, cfg, opts: CIMOptions) -> None:
        m = cfg.model
        if opts.share_layers and opts.shared_layers(m.arch) == 0:
            raise ValueError(f"method.share_layers={opts.share_layers} needs a ViT enhancer and the BEiT generator "
                             f"(model.arch=vit, method.generator=beit); set method.share_layers=0")
        if m.arch == "resnet" and any(side % m.output_stride for side in m.img_size):
            raise ValueError(f"model.img_size={m.img_size} must be a multiple of model.output_stride="
                             f"{m.output_stride} for CIM's ResNet head (each map cell predicts its pixels)")
        if m.arch == "resnet" and any(side % m.patch_size for side in m.img_size):
            raise ValueError(f"model.patch_size={m.patch_size} (with a ResNet enhancer: the generator's patch, so the "
                             f"token grid is model.img_size / model.patch_size) must divide model.img_size={m.img_size}")
        width, heads = cls.generator_shape(cfg, opts)
        if width % heads:
            raise ValueError(f"method.generator_width={width} must be a multiple of method.generator_heads={heads}")
        if opts.shared_layers(m.arch) and (width, heads) != cls.generator_shape(cfg, CIMOptions()):
            raise ValueError("shared layers need a generator as wide as the enhancer, with as many heads; drop "
                             "method.generator_width / generator_heads or set method.share_layers=0")

    @classmethod
    def inert_options(cls, o) -> list[tuple[str, str]]:
        rules = [("rgb_bins", o.generator != "mae", "with the BEiT generator (tokens, not RGB levels)"),
                 ("mae_decoder_depth", o.generator != "mae", "with the BEiT generator"),
                 ("mae_decoder_dim", o.generator != "mae", "with the BEiT generator"),
                 ("mae_decoder_heads", o.generator != "mae", "with the BEiT generator"),
                 ("generator_pretrain_share", o.generator_training == "joint", "with method.generator_training=joint"),
                 ("respix_target", o.objective != "respix", "with method.objective=revdet"),
                 ("window", o.objective != "respix" or o.respix_target != "sliding_window",
                  "unless method.objective=respix with respix_target=sliding_window")]
        return [(key, why) for key, inert, why in rules if inert]

    @classmethod
    def encoder_only_options(cls, options: dict) -> dict:
        """The same enhancer without a tokenizer file: the MAE-style generator (probing weights needs none)."""
        if options.get("generator", "beit") != "beit":
            return options
        return {**options, "generator": "mae", "share_layers": 0, "masking": "random"}

    @staticmethod
    def generator_shape(cfg, opts: CIMOptions) -> tuple[int, int]:
        """(width, heads) of the generator: the ViT enhancer's, or 384 / (width / 64) with a ResNet (Table 13)."""
        if cfg.model.arch == "vit":
            from mimkit.backbones import VIT_SIZES
            dim, _, heads, _ = VIT_SIZES.get(cfg.model.size, (None, None, None, None))
            width = opts.generator_width or cfg.model.embed_dim or dim or 384
            return width, opts.generator_heads or cfg.model.num_heads or heads or max(1, width // 64)
        width = opts.generator_width or 384
        return width, opts.generator_heads or max(1, width // 64)

    def __init__(self, cfg: Config, in_chans: int, opts: CIMOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        self.in_chans, arch = in_chans, cfg.model.arch
        self.stages = (JOINT,) if o.generator_training == "joint" else (GENERATOR_ONLY, ENHANCER_ONLY)
        self.enhancer = build_backbone(cfg.model, in_chans, mask_token=False, sincos_pos=False)
        img_size = tuple(cfg.model.img_size)
        self.map_grid = self.enhancer.grid   # the head works per patch token (ViT) / cell of the last map (ResNet)
        self.cell = (img_size[0] // self.map_grid[0], img_size[1] // self.map_grid[1])   # pixels each one covers
        width, heads = self.generator_shape(cfg, o)
        if o.generator == "beit":
            declared = (img_size[0] // cfg.model.patch_size, img_size[1] // cfg.model.patch_size)
            tokenizer = self.attach_tokenizer(cfg, in_chans, self.enhancer.grid if arch == "vit" else declared)
            self.token_grid = self.tokenizer_grid
            gen_cfg = self.generator_model_cfg(cfg, img_size, self.token_grid)
            self.generator = BEiTGenerator(gen_cfg, in_chans, tokenizer.vocab_size, o.generator_depth, width, heads)
        else:
            patch = self.enhancer.patch_size[0] if arch == "vit" else cfg.model.patch_size
            if img_size[0] % patch or img_size[1] % patch:
                raise ValueError(f"the MAE-style generator's patch size {patch} (model.patch_size) must divide "
                                 f"model.img_size={list(img_size)}")
            self.token_grid = (img_size[0] // patch, img_size[1] // patch)
            gen_encoder = ViTBackbone(img_size, patch, in_chans, embed_dim=width, depth=o.generator_depth,
                                      num_heads=heads, sincos_pos=True, mask_token=False)
            self.generator = MAEGenerator(gen_encoder, MAEOptions(mask_ratio=o.mask_ratio, norm_pix_loss=False,
                                                                  decoder_dim=o.mae_decoder_dim or width,
                                                                  decoder_depth=o.mae_decoder_depth,
                                                                  decoder_heads=o.mae_decoder_heads or heads),
                                         outputs_per_pixel=o.rgb_bins)
        self.share(o.shared_layers(arch))
        self.tokens_per_cell, self.pool_cells = self.token_map(self.map_grid, self.token_grid)
        out_dim = self.cell[0] * self.cell[1] * in_chans if o.objective == "respix" else self.tokens_per_cell ** 2
        self.head = nn.Linear(self.enhancer.embed_dim, out_dim)
        self.weight = o.enhancer_weight if o.enhancer_weight is not None else (10.0 if o.objective == "respix" else 1.0)

    @staticmethod
    def generator_model_cfg(cfg, img_size: tuple[int, int], token_grid: tuple[int, int]):
        """The BEiT generator's ViT config: patches of image size / token grid (the enhancer's for a ViT)."""
        if img_size[0] % token_grid[0] or img_size[1] % token_grid[1] or \
                img_size[0] // token_grid[0] != img_size[1] // token_grid[1]:
            raise ValueError(f"the tokenizer's {token_grid[0]}x{token_grid[1]} token grid does not tile "
                             f"model.img_size={list(img_size)} in square patches; choose an image size that is the "
                             f"same multiple of both sides of the token grid")
        if cfg.model.arch == "vit":
            return cfg.model
        return dataclasses.replace(cfg.model, arch="vit", size="small", patch_size=img_size[0] // token_grid[0],
                                   depth=None, embed_dim=None, num_heads=None, drop_path=0.0)

    def share(self, layers: int) -> None:
        """The generator's patch embedding and first `layers` blocks become the enhancer's (the same modules)."""
        for i in range(layers):
            self.generator.backbone.model.blocks[i] = self.enhancer.model.blocks[i]
        if layers:
            self.generator.backbone.model.patch_embed = self.enhancer.model.patch_embed

    @staticmethod
    def token_map(map_grid: tuple[int, int], token_grid: tuple[int, int]) -> tuple[int, int]:
        """(r, s): each map cell predicts r x r tokens (map coarser than the token grid), or s x s cells are
        average-pooled onto one token (map finer); (1, 1) when they match."""
        (h, w), (gh, gw) = map_grid, token_grid
        if (h, w) == (gh, gw):
            return 1, 1
        if gh % h == 0 and gw % w == 0 and gh // h == gw // w:
            return gh // h, 1
        if h % gh == 0 and w % gw == 0 and h // gh == w // gw:
            return 1, h // gh
        raise ValueError(f"the enhancer's {h}x{w} feature map does not tile the {gh}x{gw} token grid; change "
                         f"model.img_size or model.output_stride so one is a whole multiple of the other")

    @property
    def encoder(self):
        return self.enhancer

    def optim_groups(self):
        enhancer = {id(p) for p in self.enhancer.parameters()} | {id(p) for p in self.head.parameters()}
        return {"generator": [(n, p) for n, p in self.generator.named_parameters() if p.requires_grad and id(p) not in enhancer],
                "enhancer": [(n, p) for n, p in [*self.enhancer.named_parameters(prefix="enhancer"),
                                                 *self.head.named_parameters(prefix="head")] if p.requires_grad]}

    def schedule(self, step: int, epoch: int, total_steps: int) -> tuple[Stage, ...]:
        if self.opts.generator_training == "joint":
            return self.stages
        return (GENERATOR_ONLY,) if step < round(self.opts.generator_pretrain_share * total_steps) else (ENHANCER_ONLY,)

    def group_steps(self, group: str, total_steps: int) -> tuple[int, int]:
        """pretrain_then_freeze: two runs in one (A.1), each group with its own warm-up and decay over its part."""
        if self.opts.generator_training == "joint":
            return super().group_steps(group, total_steps)
        switch = round(self.opts.generator_pretrain_share * total_steps)
        return (0, switch) if group == "generator" else (switch, total_steps)

    def cost_points(self, total_steps: int) -> list[tuple[int, int, float]]:
        """pretrain_then_freeze: the generator alone, then the enhancer alone, each for its share of the steps."""
        if self.opts.generator_training == "joint":
            return super().cost_points(total_steps)
        switch = round(self.opts.generator_pretrain_share * total_steps)
        return [(0, 1, switch / total_steps), (total_steps - 1, 1, 1 - switch / total_steps)]

    # ------------------------------------------------------------------ generator and corruption
    def mask(self, images: torch.Tensor) -> torch.Tensor:
        b, (gh, gw) = images.shape[0], self.token_grid
        if self.opts.generator == "mae":
            return self.generator.mask(images)
        if self.opts.masking == "block":
            return block_mask(b, self.token_grid, self.opts.mask_ratio, images.device, min_block=beit_min_block(gh * gw))
        return random_mask(b, self.token_grid, self.opts.mask_ratio, images.device, round(gh * gw * self.opts.mask_ratio))

    def corrupt(self, images: torch.Tensor, mask: torch.Tensor, golden: torch.Tensor | None = None) -> dict:
        """Generator logits, golden / corrupted ids (tokens [B, L], or pixel levels [B, L, p*p*C] for the MAE-style
        generator), per-token REVDET labels [B, L] and the corrupted image (normalised as the data)."""
        golden = self.golden_ids(images) if golden is None else golden
        logits = self.generator(images, mask)
        if self.opts.generator == "mae":
            logits = logits.unflatten(-1, (-1, self.opts.rgb_bins))                      # [B, L, p*p*C, bins]
        sampled = sample_replacements(logits.detach(), self.opts.sampling)
        step_mask = mask if sampled.ndim == 2 else mask[..., None]
        corrupted_ids = torch.where(step_mask, sampled, golden)
        replaced = replaced_token_labels(golden, corrupted_ids, step_mask)
        if replaced.ndim == 3:            # a patch is replaced iff any of its levels is
            replaced = replaced.amax(-1)
        image = self.images_from_ids(corrupted_ids, images) if self.opts.generator == "beit" else \
            self.images_from_levels(corrupted_ids, images)
        return {"logits": logits, "golden": golden, "corrupted_ids": corrupted_ids, "replaced": replaced,
                "corrupted": image}

    def golden_ids(self, images: torch.Tensor) -> torch.Tensor:
        if self.opts.generator == "beit":
            return self.token_ids(images)
        levels = (self.to_pixels(images) * self.opts.rgb_bins).floor().clamp_(max=self.opts.rgb_bins - 1).long()
        return patchify(levels, self.generator.encoder.patch_size)                         # [B, L, p*p*C]

    def images_from_levels(self, levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        pixels = unpatchify((levels.float() + 0.5) / self.opts.rgb_bins, self.generator.encoder.patch_size,
                            self.token_grid, self.in_chans)
        return self.from_pixels(pixels).to(like.dtype)

    def enhance(self, corrupted: torch.Tensor) -> torch.Tensor:
        """Enhancer + linear head on every patch token / map cell -> [B, h*w, out]."""
        if isinstance(self.enhancer, ViTBackbone):
            tokens = self.enhancer.model.forward_features(corrupted)[:, self.enhancer.num_prefix:]
            return self.head(tokens)
        fmap = self.enhancer.forward_features(corrupted)                                     # [B, D, h, w]
        if self.opts.objective == "revdet" and self.pool_cells > 1:
            fmap = F.avg_pool2d(fmap, self.pool_cells)
        return self.head(fmap.flatten(2).transpose(1, 2))

    def revdet_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Head output -> one logit per token [B, gh*gw] (a cell's r x r logits laid out over its tokens)."""
        r = self.tokens_per_cell
        if r == 1:
            return out[..., 0].float()
        grid = (self.token_grid[0] // r, self.token_grid[1] // r)
        return unpatchify(out.float(), r, grid, 1).flatten(1)

    def respix_target(self, images: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if o.respix_target == "sliding_window":
            return sliding_window_pixels(images, o.window)
        if o.respix_target == "patch_norm":
            return unpatchify(patch_pixels(images, self.cell, normalize=True), self.cell, self.map_grid, self.in_chans)
        return images.float()

    # ------------------------------------------------------------------ loss
    def forward(self, images: torch.Tensor, stage: str = "joint", carry: dict | None = None) -> dict:
        mask = self.mask(images)
        if stage == "enhancer":          # A.1's second part: the generator is fixed
            with torch.no_grad():
                c = self.corrupt(images, mask)
            loss, parts = 0.0, {}
        else:
            c = self.corrupt(images, mask)
            logits, golden = c["logits"][mask].float(), c["golden"][mask]
            loss = F.cross_entropy(logits.flatten(0, -2), golden.flatten())
            parts = {"loss_gen": loss, "gen_token_accuracy": (logits.detach().argmax(-1) == golden).float().mean()}
            if stage == "generator":
                return {"loss": loss, "parts": parts}
        out = self.enhance(c["corrupted"])
        if self.opts.objective == "respix":
            pred = unpatchify(out.float(), self.cell, self.map_grid, self.in_chans)
            diff = pred - self.respix_target(images)
            parts["loss_respix"] = loss_enh = diff.abs().mean() + diff.pow(2).mean()
        else:
            labels, logits = c["replaced"], self.revdet_logits(out)
            parts["loss_revdet"] = loss_enh = F.binary_cross_entropy_with_logits(logits, labels)
            parts["revdet_accuracy"] = ((logits.detach() > 0).float() == labels).float().mean()
            parts["revdet_all_original_accuracy"] = 1 - labels.mean()
        return {"loss": loss + self.weight * loss_enh, "parts": parts}

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """original | masked | four corrupted images from the same masked input (Fig. 2) | enhancer output of the
        first: RESPIX as Fig. 3a (the normalised prediction un-normalised with the *original's* window or patch
        statistics: the answer's mean and std are injected, A.2) and as Fig. 3b (the prediction itself, stretched to
        the display range per image: nothing injected); REVDET P(replaced) per token."""
        mask = self.mask(images)
        patch = (images.shape[-2] // self.token_grid[0], images.shape[-1] // self.token_grid[1])
        keep = 1 - mask_to_pixels(mask, patch, self.token_grid).to(images.dtype)
        golden = self.golden_ids(images)
        draws = [self.corrupt(images, mask, golden) for _ in range(4)]
        rows = [("original", images), ("masked", images * keep)]
        rows += [(f"corrupted {i + 1}", d["corrupted"]) for i, d in enumerate(draws)]
        out = self.enhance(draws[0]["corrupted"])
        if self.opts.objective == "respix" and self.opts.respix_target != "none":
            rows.append(("output + original's stats (3a)", self.display_respix(out, images)))
            predicted = unpatchify(out.float(), self.cell, self.map_grid, self.in_chans)
            rows.append(RenderedRow("output as predicted (3b)", stretch_per_image(predicted)))
        elif self.opts.objective == "respix":
            rows.append(("enhancer output", self.display_respix(out, images)))
        else:
            p_replaced = torch.sigmoid(self.revdet_logits(out))
            rows.append(RenderedRow("P(replaced)", patch_overlay(self.to_pixels(draws[0]["corrupted"]), p_replaced,
                                                                 self.token_grid)))
        return rows

    def display_respix(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        pred = unpatchify(out.float(), self.cell, self.map_grid, self.in_chans)
        if self.opts.respix_target == "sliding_window":
            mean, var = sliding_window_stats(images, self.opts.window)
            return (pred * (var + 1e-6) ** 0.5 + mean).to(images.dtype)
        if self.opts.respix_target == "patch_norm":
            real = patch_pixels(images, self.cell)
            p = unnormalize_patches(patch_pixels(pred, self.cell), real)
            return unpatchify(p, self.cell, self.map_grid, self.in_chans).to(images.dtype)
        return pred.to(images.dtype)


def stretch_per_image(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] of any range -> RGB in [0, 1], each image's min to 0 and max to 1 (the first three channels, or
    the one channel repeated): a normalised prediction shown without borrowing any statistics."""
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - low) / (high - low).clamp(min=1e-6)
