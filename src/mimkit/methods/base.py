"""The method contract every paper implementation follows, and the weight-loading helper they share.

A method is an nn.Module that
- declares its optimiser groups (`optim_groups`: name -> named parameters, each parameter in one group)
  and its update order (`stages`): each
  stage runs a forward for the named stage, one backward, and steps the optimisers of its groups;
- returns {"loss": scalar, "parts": {name: scalar}} from `forward(images, stage, carry)`; `carry` is a
  dict that lives through one training step, so a later stage can reuse what an earlier one made, and
  holds the 0-based `step`, `epoch` and `total_steps` (loss weights that change over training read them);
- may choose which stages run at a step (`schedule(step, epoch, total_steps)`: Perceptual MAE's even
  epochs, lazy R1, GAN-MAE's two-stage scheme);
  the choice is a function of the step, so a resumed run makes the same ones; `epoch` is the recipe epoch,
  compressed with the run when `train.steps` shortens the recipe; `declared_terms` / `terms_at` name what a run
  never reaches (one warning);
- registers frozen parts (tokenizers, loss networks) with `register_frozen`;
- never calls `optimizer.step()` itself: the engine does, in the declared order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    """One update in a training step: which forward to run and which optimiser groups it steps. `keep_grads`: groups
    whose gradients from an earlier stage of the same step are kept and added to (not zeroed), so one update takes
    both stages' gradients (GAN-MAE's `backbone_update=once`)."""
    name: str
    groups: tuple[str, ...]
    keep_grads: tuple[str, ...] = ()


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model, with a sentence saying why and what to do."""


class Method(nn.Module):
    options: type = None                     # dataclass of the method's config keys (method.*)
    stages: tuple[Stage, ...] = (Stage("model", ("model",)),)   # every stage the schedule may choose from
    no_weight_decay_keys: tuple[str, ...] = ()   # parameter-name fragments kept out of weight decay
    archs: tuple[str, ...] = ("vit", "swin")     # the model.arch values it can pre-train
    relative_positions: bool = False             # model.position=shared_relative allowed (every token encoded)
    clip_scope: str = "group"                    # optim.clip_grad per optimiser group, or "stage": one global norm

    @classmethod
    def check_config(cls, cfg, opts) -> None:
        """Checks across config sections (method options against model.*), run when the config is read;
        raises ValueError with one sentence naming the fix."""

    @classmethod
    def inert_options(cls, opts) -> list[tuple[str, str]]:
        """(option, why) for each `method.*` option that has no effect given the others (e.g. GAN-MAE's
        two_stage_switch outside the two-stage scheme); one set in a recipe or override is refused with the reason
        when the config is read. Default: none."""
        return []

    def set_pixel_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The data's per-channel mean/std [1, C, 1, 1] (the engine normalises images with them), for methods
        that need pixels in [0, 1] again, e.g. to feed a tokenizer: `to_pixels(images)`."""
        self.pixel_mean, self.pixel_std = mean, std

    def to_pixels(self, images: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised images -> [0, 1] pixels (clamped, or not where every pixel needs a gradient)."""
        mean, std = self.pixel_mean.to(images.device), self.pixel_std.to(images.device)
        pixels = images.float() * std + mean
        return pixels.clamp(0, 1) if clamp else pixels

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self.pixel_mean.to(pixels.device), self.pixel_std.to(pixels.device)
        return (pixels - mean) / std

    def schedule(self, step: int, epoch: int, total_steps: int) -> tuple[Stage, ...]:
        """The stages to run at this step (0-based) and epoch of a `total_steps` run, in order. A pure function of its arguments,
        so a resumed run makes the same choices. Default: every declared stage, every step."""
        return self.stages

    def headline(self, row: dict) -> dict[str, float]:
        """What a logged row's top-level `loss` and the progress line show, from the row's averaged parts (names as
        logged, `STAGE/` first where several stages run): {name: value}, the first value becoming `loss` (the sum of
        the stages' losses is then kept as `loss_sum_of_stages`). Default: {} (the sum is the loss). For a method
        whose stages pull against each other (GAN-MAE: L_adv ~ -L_disc) the sum reads like nothing."""
        return {}

    def val_headline(self, row: dict) -> dict[str, float]:
        """What `val/loss` is on held-out images (Trainer.validate): the parts comparable from step to step. Default:
        `headline`'s, else the sum of the stages' losses; a method whose loss holds an adversarial term against a
        critic that keeps changing names its reconstruction part instead."""
        return self.headline(row)

    def declared_terms(self) -> set[str]:
        """The stages and scheduled loss terms this method declares; the engine warns once about any that no step of a
        run reaches (e.g. a perceptual term on even epochs in a run shorter than two). Default: the stages."""
        return {stage.name for stage in self.stages}

    def terms_at(self, step: int, epoch: int, total_steps: int) -> set[str]:
        """Which of `declared_terms` run at this step. Default: the scheduled stages."""
        return {stage.name for stage in self.schedule(step, epoch, total_steps)}

    def group_steps(self, group: str, total_steps: int) -> tuple[int, int]:
        """[start, end) of the steps in which an optimiser group trains; its warm-up and lr decay run over that span
        (CIM's A.1: the enhancer trained as its own run after the generator's). Default: the whole run."""
        return 0, total_steps

    def cost_points(self, total_steps: int) -> list[tuple[int, int, float]]:
        """(step, epoch, weight) points whose weighted mean per-step cost is the cost averaged over a run's schedule
        (`engine.cost.flops_per_image`). Default: one step late in the run, all steps alike."""
        return [(total_steps - 1, 1, 1.0)]

    def optim_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Optimiser group name -> the (name, parameter) pairs it updates; every trainable parameter in one group.
        A group may be empty (e.g. GAN-MAE's shared backbone when sharing is off): it gets no optimiser."""
        return {"model": [(n, p) for n, p in self.named_parameters() if p.requires_grad]}

    @property
    def encoder(self) -> nn.Module:
        """The backbone that is the result of pre-training (exported as a timm model)."""
        raise NotImplementedError

    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Rows of the sample grid, e.g. [("original", x), ("masked", ...), ("reconstruction", ...)], images in the
        data's normalisation; a row already rendered for display (RGB in [0, 1], e.g. a heat map) is a
        `RenderedRow`."""
        raise NotImplementedError

    @classmethod
    def encoder_only_options(cls, options: dict) -> dict:
        """`method.*` options that build the same encoder without frozen parts (no tokenizer file), for probing and
        fine-tuning foreign weights with `--config`. Default: unchanged."""
        return options

    def pretrained_parts(self, state_dict: dict) -> list:
        """The modules `--init FILE` fills from a checkpoint's state dict, as `pretrained.Part`s in the
        modules' own keys. Default: the encoder alone (required)."""
        from mimkit.pretrained import Part, encoder_state
        return [Part("encoder", self.encoder, encoder_state(state_dict, self.encoder))]

    # ------------------------------------------------------------------ frozen parts
    def register_frozen(self, name: str, module: nn.Module, source: str) -> nn.Module:
        """Adds a frozen part (tokenizer, loss network) loaded from the file `source`: it stays in eval mode,
        gets no gradient and no optimiser state, and run checkpoints name it by path and hash instead of
        storing it (the method reloads it from `source` when it is built again)."""
        module.requires_grad_(False)
        module.eval()
        self.__dict__.setdefault("_frozen_sources", {})[name] = str(source)
        setattr(self, name, module)
        return module

    def attach_tokenizer(self, cfg, in_chans: int, grid: tuple[int, int] | None):
        """The frozen tokenizer `tokenizer.path` names, registered as the frozen part `tokenizer`, with the size it
        is fed (`tokenizer.input_size`, default: the size whose token grid is `grid`, the grid the method predicts
        on; None: the tokenizer's own training size, else the model's), checked against the data's channels and
        that grid (one sentence each). The size and token grid are stored beside the file's hash in checkpoints."""
        from mimkit.tokenizers import load_tokenizer
        if not cfg.tokenizer.path:
            raise ValueError(f"{type(self).__name__} needs a tokenizer: set tokenizer.path=RUN/last.pt (from 'mimkit "
                             f"tokenizer train') or a tokenizer .safetensors file")
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        size = tokenizer.input_size_for(grid, cfg.tokenizer.input_size, cfg.model.img_size)
        tokenizer.check_fits(in_chans, size, grid)
        self.tokenizer_size, self.tokenizer_grid = tuple(size), tuple(tokenizer.grid_for(size))
        return self.register_frozen("tokenizer", tokenizer, cfg.tokenizer.path)

    def token_ids(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen tokenizer's ids [B, h*w] of normalised images, resized to the tokenizer's input size first
        (e.g. 224 -> 112 px for DALL-E's; bicubic with antialiasing, as torch has no Lanczos)."""
        with torch.no_grad():
            return self.tokenizer.encode(self.tokenizer_input(self.to_pixels(images)).clamp(0, 1)).flatten(1)

    def tokenizer_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels resized to the tokenizer's input size (bicubic, antialiased; differentiable)."""
        if tuple(pixels.shape[-2:]) == self.tokenizer_size:
            return pixels
        return torch.nn.functional.interpolate(pixels, size=self.tokenizer_size, mode="bicubic", antialias=True,
                                               align_corners=False)

    def images_from_ids(self, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The frozen tokenizer's decoding of ids [B, h*w], resized to `like`'s size and normalised as `like`."""
        with torch.no_grad():
            decoded = self.tokenizer.decode(ids.view(-1, *self.tokenizer_grid)).float()
        if tuple(decoded.shape[-2:]) != tuple(like.shape[-2:]):
            decoded = torch.nn.functional.interpolate(decoded, size=like.shape[-2:], mode="bilinear", antialias=True)
        return self.from_pixels(decoded.clamp(0, 1)).to(like.dtype)

    def frozen_use(self, name: str) -> dict:
        """How the method uses a frozen part (a tokenizer: the size it is fed and its token grid)."""
        if name == "tokenizer" and hasattr(self, "tokenizer_size"):
            return {"input_size": list(self.tokenizer_size), "token_grid": list(self.tokenizer_grid)}
        return {}

    @property
    def frozen_parts(self) -> dict[str, str]:
        """Frozen part name -> the file it was loaded from."""
        return dict(self.__dict__.get("_frozen_sources", {}))

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_parts:
            getattr(self, name).eval()
        return self

    def trainable_state_dict(self) -> dict:
        """state_dict without the frozen parts (what a run checkpoint stores)."""
        prefixes = tuple(f"{name}." for name in self.frozen_parts)
        return {k: v for k, v in self.state_dict().items() if not (prefixes and k.startswith(prefixes))}

    def load_run_state(self, state: dict) -> None:
        """Loads a run checkpoint's weights; only the frozen parts (reloaded from their files) may be absent."""
        result = self.load_state_dict(state, strict=False)
        prefixes = tuple(f"{name}." for name in self.frozen_parts)
        missing = [k for k in result.missing_keys if not (prefixes and k.startswith(prefixes))]
        if missing or result.unexpected_keys:
            raise CheckpointMismatch(f"the run checkpoint does not fit this {type(self).__name__}: "
                                     f"{len(missing)} weights missing (e.g. {(missing or ['-'])[0]}), "
                                     f"{len(result.unexpected_keys)} unexpected (e.g. {(result.unexpected_keys or ['-'])[0]}); "
                                     f"was it written by another version or method?")

    def load_initial_weights(self) -> list[str]:
        """Loads the weights the method's own options name (e.g. Vision ELECTRA's `generator_init`); returns
        one report line per file. Called on a fresh run only: a resumed run has them in its checkpoint."""
        return []


def init_xavier_linears(module: nn.Module) -> None:
    """MAE's and CAE's official init of every Linear below `module` (xavier-uniform, zero bias) and LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def mismatch_sentence(key: str, theirs: tuple, ours: tuple, source: str) -> str:
    if key.endswith("patch_embed.proj.weight") and len(theirs) == 4 and theirs[1] != ours[1]:
        return (f"{source} was trained on {theirs[1]}-channel images but this model takes {ours[1]} channels; "
                f"use data with {theirs[1]} channels or start from scratch without --init")
    if key.endswith("patch_embed.proj.weight") and len(theirs) == 4 and theirs[2:] != ours[2:]:
        return (f"{source} uses patch size {theirs[2]}x{theirs[3]} but the config asks for {ours[2]}x{ours[3]}; "
                f"set model.patch_size={theirs[2]}")
    return (f"{source} does not fit this model: '{key}' has shape {list(theirs)} there and {list(ours)} here; "
            f"set model.size / model.embed_dim / model.depth to the checkpoint's architecture")
