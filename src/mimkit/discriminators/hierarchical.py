"""Vision ELECTRA's hierarchical discriminator (Sec. 3.1, 3.3): one backbone over every token of the image
(no masking), a CNN patch head over the token grid (micro level, one logit per patch) and a linear image
head (macro level) on the CLS token.

Swin has no CLS token and ends at stride 32: with a Swin backbone the image head reads the mean of the last
stage's features, and each patch takes the logit of the last-stage cell that covers it (with SimMIM's 32-px
mask patches a cell is wholly generated or wholly original).

GAN-MAE's discriminator ("identical to a ViT for classification", one verdict per token) is the same module
with a linear patch head (`patch_head="linear"`: one logit per token from its own feature) and no image head."""
from __future__ import annotations

import torch
from torch import nn

from mimkit.backbones import SwinBackbone, ViTBackbone


class CNNPatchHead(nn.Module):
    """Feature map [B, D, h, w] -> one logit per cell [B, 1, h, w].

    The paper only says "CNN-based"; mimkit's choice: 3x3 conv (D -> hidden) + GELU + 1x1 conv (hidden -> 1),
    so each patch's verdict also sees its 8 neighbours."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.net(feature_map)


class HierarchicalDiscriminator(nn.Module):
    """forward(images) -> (patch logits [B, L], image logits [B]); logit > 0 means "original".

    A level whose head is switched off (Vision ELECTRA's Table 3 ablations) has no head and returns None.
    `patch_head`: True or "cnn" (Vision ELECTRA), "linear" (GAN-MAE: a 1x1 convolution, i.e. a linear layer per
    token), False (none)."""

    def __init__(self, backbone: ViTBackbone | SwinBackbone, patch_head_hidden: int | None = None,
                 patch_head: bool | str = True, image_head: bool = True):
        super().__init__()
        if patch_head not in (True, False, "cnn", "linear"):
            raise ValueError(f"patch_head must be cnn, linear or off, not {patch_head!r}")
        self.backbone = backbone
        if patch_head == "linear":
            self.patch_head = nn.Conv2d(backbone.embed_dim, 1, 1)
        else:
            self.patch_head = CNNPatchHead(backbone.embed_dim, patch_head_hidden) if patch_head else None
        self.image_head = nn.Linear(backbone.embed_dim, 1) if image_head else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        feats = self.backbone.forward_features(images)
        patch_logits = image_logits = None
        if isinstance(self.backbone, ViTBackbone):                                  # [B, 1+L, D]
            if self.patch_head is not None:
                gh, gw = self.backbone.grid
                patches = feats[:, self.backbone.num_prefix:]
                grid_map = patches.transpose(1, 2).reshape(feats.shape[0], -1, gh, gw)
                patch_logits = self.patch_head(grid_map).flatten(1)                 # micro level [B, L]
            if self.image_head is not None:
                image_logits = self.image_head(feats[:, 0]).squeeze(-1)            # macro level (CLS)
            return patch_logits, image_logits
        if self.patch_head is not None:
            cells = self.patch_head(feats.permute(0, 3, 1, 2))                      # Swin: [B, 1, h, w]
            sh, sw = self.backbone.grid[0] // cells.shape[-2], self.backbone.grid[1] // cells.shape[-1]
            patch_logits = cells.repeat_interleave(sh, dim=2).repeat_interleave(sw, dim=3).flatten(1)
        if self.image_head is not None:
            image_logits = self.image_head(feats.mean(dim=(1, 2))).squeeze(-1)
        return patch_logits, image_logits


def forward_frozen(discriminator: nn.Module, *inputs):
    """The discriminator's output with every parameter detached: gradients reach the images (the generator)
    only, never D's weights, even where D shares its backbone with the generator.

    Every parameter of D is replaced by a detached copy (the same storage) for the call, and again as each
    submodule that owns parameters starts to run (a forward pre-hook): under FSDP2 a block's own pre-forward hook
    puts its gathered parameters in place just before, which a swap made only before the call (as
    torch.func.functional_call's) would leave in the graph. Each swap is undone only where the copy is still in
    place, so FSDP's own later swaps stand."""
    swapped: dict[nn.Module, dict[str, tuple[nn.Parameter, nn.Parameter]]] = {}   # module -> name -> (copy, original)

    def detach(module, args=None):
        for name, p in module._parameters.items():
            if p is not None and p.requires_grad:
                copy = nn.Parameter(p.detach(), requires_grad=False)
                swapped.setdefault(module, {})[name] = copy, p
                module._parameters[name] = copy

    def restore(module, args=None, output=None):
        for name, (copy, original) in swapped.pop(module, {}).items():
            if module._parameters.get(name) is copy:
                module._parameters[name] = original

    owners = [m for m in discriminator.modules() if any(p is not None for p in m._parameters.values())]
    handles = [h for m in owners for h in (m.register_forward_pre_hook(detach), m.register_forward_hook(restore))]
    try:
        for module in owners:
            detach(module)
        return discriminator(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module in owners:
            restore(module)
