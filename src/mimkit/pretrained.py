"""Starting from existing weights: official MAE and SimMIM release layouts, mimkit runs and exports,
loaded module by module (encoder, decoder, heads) with a count per module.

Every `--init` and `method.*_init` path goes through `load_parts`: a module the user asked to initialise
that the file leaves wholly at its init is an error, a tensor of the file that the module has no place
for is an error (it means another architecture, e.g. layer scale), and the report names what stayed
at its init.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from mimkit.backbones import SwinBackbone, ViTBackbone, sincos_pos_embed_2d
from mimkit.methods.base import CheckpointMismatch, mismatch_sentence

# Run-checkpoint prefixes of the encoder, most specific first (a VE run holds two encoders: D's is the result).
RUN_ENCODER_PREFIXES = ("discriminator.backbone.", "generator.encoder.", "backbone.", "encoder.")
MAE_DECODER_KEYS = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")
CLASSIFIER_KEYS = ("head.", "fc_norm.")   # a fine-tuned classifier's head is not part of any encoder


@dataclass
class Part:
    """One module to initialise: `state` uses the module's own key names."""
    name: str
    module: nn.Module
    state: dict
    required: bool = True
    prefixes: tuple[str, ...] | None = None   # only the module's keys that start with these belong to the part
    reshaped_ok: tuple[str, ...] = ()         # keys (prefixes) a file may hold in another shape: left at init, named
                                              # (e.g. a head for another vocabulary or target)


def load_parts(parts: list[Part], source: str) -> str:
    """Loads each part; returns one line per part, e.g. 'encoder: 52/52 tensors loaded'.

    Raises CheckpointMismatch (one sentence) on a shape mismatch, a tensor with no place in the module,
    or a required part of which nothing loads.
    """
    lines = []
    for part in parts:
        own = part.module.state_dict()
        if part.prefixes is not None:
            own = {k: v for k, v in own.items() if k.startswith(part.prefixes)}
        extra = sorted(k for k in part.state if k not in own)
        if extra:
            raise CheckpointMismatch(_extra_sentence(part.name, extra, source))
        reshaped = {k: (list(v.shape), list(own[k].shape)) for k, v in part.state.items()
                    if part.reshaped_ok and k.startswith(part.reshaped_ok) and v.shape != own[k].shape}
        part.state = {k: v for k, v in part.state.items() if k not in reshaped}
        for key, value in part.state.items():
            if tuple(own[key].shape) != tuple(value.shape):
                raise CheckpointMismatch(mismatch_sentence(key, tuple(value.shape), tuple(own[key].shape), source))
        if part.required and not part.state:
            raise CheckpointMismatch(f"{source} holds no weights for the {part.name}; it is not a checkpoint of "
                                     f"this kind of model (MAE, SimMIM or a mimkit run), or point the option at one")
        part.module.load_state_dict(part.state, strict=False)
        left = [k for k in own if k not in part.state and k not in reshaped]
        line = f"{part.name}: {len(part.state)}/{len(own)} tensors loaded"
        if left:
            line += f", left at init: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}"
        if reshaped:
            shapes = ", ".join(f"{k} {theirs} there, {ours} here" for k, (theirs, ours) in reshaped.items())
            line += f", left at init (another shape in the file): {shapes}"
        if isinstance(part.module, ViTBackbone) and "model.pos_embed" in part.state and learn_loaded_positions(part.module):
            line += " (its position table is learnt: trainable)"
        lines.append(line)
    return f"initialised from {source}: " + "; ".join(lines)


def _extra_sentence(name: str, extra: list[str], source: str) -> str:
    if any(k.endswith(("ls1.gamma", "ls2.gamma")) for k in extra):
        return (f"{source}'s {name} uses layer scale (gamma weights) but this model's {name} has none; "
                f"build it with layer scale (SimMIM: method.layer_scale, Vision ELECTRA's discriminator: "
                f"method.discriminator_layer_scale) or start from a checkpoint without it")
    if any("rel_pos_bias." in k for k in extra):
        return (f"{source}'s {name} uses a relative position bias shared by all blocks (SimMIM's ViT); build it that "
                f"way: model.position=shared_relative")
    return (f"{source} holds {len(extra)} {name} tensors this model has no place for (e.g. '{extra[0]}'); it is "
            f"another architecture: match model.size / model.depth / model.patch_size to it")


# ---------------------------------------------------------------------- layouts
def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def encoder_state(state: dict, backbone: ViTBackbone | SwinBackbone) -> dict:
    """The encoder inside any supported checkpoint, in `backbone`'s keys ('model.*', 'mask_token').

    mimkit run (any method), official SimMIM (`encoder.*`, BEiT-style ViT), official MAE or a timm export
    (bare timm keys). A position table for another grid is resampled when the backbone learns it, and left
    out (the backbone's own sin-cos table is the right one) when it is fixed.
    """
    for prefix in RUN_ENCODER_PREFIXES:
        found = strip_prefix(state, prefix)
        if any(k.startswith("model.") for k in found):
            out = {k: v for k, v in found.items() if k.startswith("model.") or k == "mask_token"}
            break
    else:
        simmim = strip_prefix(state, "encoder.")
        if simmim:
            if isinstance(backbone, SwinBackbone):
                from timm.models.swin_transformer import checkpoint_filter_fn
                converted = checkpoint_filter_fn({k: v for k, v in simmim.items() if k != "mask_token"}, backbone.model)
            elif getattr(backbone, "relative", False):    # SimMIM's own ViT: timm Beit has its key names
                converted = {k: v for k, v in simmim.items() if k != "mask_token"
                             and not k.endswith(("relative_position_index", "k_bias"))}
            else:
                converted = simmim_vit_to_timm(simmim)
            out = {f"model.{k}": v for k, v in converted.items()}
            if "mask_token" in simmim:
                out["mask_token"] = simmim["mask_token"]
        else:
            out = {f"model.{k}": v for k, v in state.items()
                   if not k.startswith(MAE_DECODER_KEYS + CLASSIFIER_KEYS) and not k.startswith(("generator.", "discriminator."))}
    if backbone.mask_token is None:
        out.pop("mask_token", None)
    elif "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(backbone.mask_token.shape)
    pos = out.get("model.pos_embed")
    if pos is not None and isinstance(backbone, ViTBackbone) and backbone.model.pos_embed is None:
        raise CheckpointMismatch("the file's encoder has an absolute position table but this ViT uses a shared relative "
                                 "position bias (model.position=shared_relative); set model.position=absolute")
    if pos is not None and isinstance(backbone, ViTBackbone) and pos.shape[1] != backbone.model.pos_embed.shape[1]:
        if backbone.model.pos_embed.requires_grad:
            out["model.pos_embed"] = resample_abs_pos_embed(pos, list(backbone.grid), num_prefix_tokens=backbone.num_prefix)
        else:
            del out["model.pos_embed"]
    return out


def is_sincos_table(pos_embed: torch.Tensor, grid: tuple[int, int]) -> bool:
    """Whether a [1, 1+L, D] position table is a fixed 2-D sin-cos one (MAE's or CAE's layout) rather than a
    learnt one."""
    if pos_embed.shape[1] != 1 + grid[0] * grid[1] or pos_embed.shape[-1] % 4:
        return False
    return any(torch.allclose(pos_embed.float(), sincos_pos_embed_2d(pos_embed.shape[-1], grid, True, rows_first), atol=1e-4)
               for rows_first in (False, True))


def learn_loaded_positions(backbone: ViTBackbone) -> bool:
    """A learnt position table loaded into a fixed slot becomes trainable again; returns whether it did."""
    pos = backbone.model.pos_embed
    if pos.requires_grad or is_sincos_table(pos.detach(), backbone.grid):
        return False
    pos.requires_grad_(True)
    return True


def simmim_vit_to_timm(encoder: dict) -> dict:
    """SimMIM's BEiT-style ViT keys -> timm VisionTransformer keys: q/v biases become one qkv bias (the
    k bias is zero), gamma_1/2 become layer-scale gammas; `mask_token` is left to the caller."""
    out = {}
    for key, value in encoder.items():
        if "relative_position" in key:
            raise CheckpointMismatch("this SimMIM ViT checkpoint uses a relative position bias shared by all blocks "
                                     "(SimMIM's own ViT); build the ViT that way: model.position=shared_relative")
        if key.endswith("attn.v_bias") or key == "mask_token":
            continue
        if key.endswith("attn.q_bias"):
            v_bias = encoder[key.replace("q_bias", "v_bias")]
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
            continue
        out[key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")] = value
    return out


def mae_generator_parts(generator, state: dict, decoder_required: bool) -> list[Part]:
    """MAE's encoder and decoder (`decoder_*`, `mask_token`) from an official release (bare keys) or a mimkit
    MAE / Vision ELECTRA run (`generator.*`)."""
    if any(k.startswith("generator.") for k in state):
        state = strip_prefix(state, "generator.")
    decoder = {k: v for k, v in state.items() if k.startswith(MAE_DECODER_KEYS)}
    own = generator.state_dict()
    pos = decoder.get("decoder_pos_embed")
    if pos is not None and pos.shape != own["decoder_pos_embed"].shape:   # fixed sin-cos: ours fits our grid
        del decoder["decoder_pos_embed"]
    return [Part("encoder", generator.encoder, encoder_state(state, generator.encoder)),
            Part("decoder", generator, decoder, decoder_required, prefixes=MAE_DECODER_KEYS)]
