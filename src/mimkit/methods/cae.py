"""CAE: Context Autoencoder for Self-Supervised Representation Learning (Chen et al.;
shared/papers/004_5e6749e9a4eebf02.txt, Sec. 3, Appendix A; Tables 1, 2, 5, 6).

- Encoder F (Sec. 3.1): a ViT over the visible patches only, fixed 2-D sin-cos positions in the official code's
  layout (rows first), layer scale (0.1 for S/B, 1e-5 for L: `method.layer_scale`), q/v biases (timm's qkv bias:
  a key bias shifts every logit of a query equally, so it is inert under the softmax).
- Latent contextual regressor H (Sec. 3.1): `regressor_depth` (4, Table 6) cross-attention blocks. Queries:
  one learnt mask query shared by every masked position; keys = values = [Z_v, previous queries]; position
  embeddings are added to the queries and keys only, never to the values; Z_v is never updated. Each block as
  the official code: LayerNorms on the query, key and value inputs, cross-attention, layer scale, a LayerNorm
  after the residual, then the MLP with layer scale. A final LayerNorm gives Z_m.
- Alignment (Eq. 1): Z-_m = F(X_m), the same encoder on the masked patches (plus its CLS token, dropped after),
  under no_grad; l_z = MSE(Z_m, sg[Z-_m]). The official code keeps a second encoder whose weights are copied
  from F after every forward; since the optimiser steps between a forward and the next, that copy always
  holds F's current weights, so mimkit runs F itself under no_grad (one encoder in memory, the same numbers).
  F is in training mode there, so drop path is active in the target, as in the official code.
- Decoder G (Sec. 3.1): `decoder_depth` (4) self-attention blocks over the masked positions only (Z_m + their
  position embeddings; no visible token), LayerNorm, a linear layer to the target. `method.decoder=false`
  (Table 2): that linear layer alone, on Z_m.
- Targets (Sec. 3.2): `target=tokens` (default): the frozen tokenizer's ids of the masked patches,
  cross-entropy; the tokenizer sees the image resized to `tokenizer.input_size`, by default the size whose
  token grid is the patch grid (DALL-E under ViT-B/16 at 224 px: 112 px; official: a second 112 px crop with
  Lanczos; here the same crop resized with bicubic antialiasing, as torch has no Lanczos). `target=pixels`
  (option): MSE on per-patch normalised pixels (`norm_pix_loss`). Loss l_y + lambda l_z, lambda = 2
  (`alignment_weight`); `method.alignment=false` (Table 2) removes l_z and its forward pass.
- Masking (Sec. 3.2): BEiT's block-wise masking of exactly round(0.5 L) patches (98 of 196), minimum block 16
  patches at 196, scaled by L / 196 on other grids (`min_block_patches` sets it).
- Init and weight decay (the official code; the paper says nothing): xavier-uniform on every Linear, the encoder's
  included (qkv std 0.026 at ViT-B where timm's init gives 0.020), trunc-normal 0.02 on the patch embedding, CLS
  token and mask query; weight decay on everything but biases and 1-D parameters, the CLS token and mask query too.
- Gradient clipping (3.0): one global norm over all parameters, as the official (BEiT-based) code
  (`clip_scope = "stage"`).
- Regressor/decoder width `decoder_dim` (default: the encoder's; the official ViT-L run uses 1024 = its
  width; a different width adds the official linear + LayerNorm projection of the encoder's output).
Official checkpoints (Atten4Vis/CAE: `encoder.*`, `alignment_encoder.*` (ignored: a copy), `regresser.*`,
`decoder.*`, `mask_token`, `rd_pos_embed`, `encoder_to_regresser*`) load with `--init` (`pretrained_parts`) into any
CAE, reported per module (encoder, regressor, decoder); a decoder head of another shape (the file's 8192-token
vocabulary under a pixel target or another tokenizer) is left at init and named. Probes and fine-tuning take such a
file with `--config` and build the encoder without a tokenizer (`encoder_only_options`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.backbones import build_backbone, sincos_pos_embed_2d
from mimkit.config import Config, method_options
from mimkit.masking import beit_min_block, block_mask, gather_tokens, visible_indices
from mimkit.methods.base import Method, init_xavier_linears
from mimkit.patches import mask_to_pixels, patchify, unpatchify
from mimkit.targets import patch_pixels, unnormalize_patches


@dataclass
class CAEOptions:
    mask_ratio: float = 0.5                 # 98 of 196 (Sec. 3.2; Table 5 tries 0.4 and 0.6)
    min_block_patches: int | None = None    # None: 16 at 196 patches, scaled to the grid
    target: str = "tokens"                  # tokens (frozen tokenizer ids, cross-entropy) | pixels (MSE)
    norm_pix_loss: bool = True              # pixels target: per-patch normalised
    alignment_weight: float = 2.0           # lambda of Eq. 1
    alignment: bool = True                  # Table 2
    decoder: bool = True                    # Table 2: false = a linear layer on Z_m
    regressor_depth: int = 4                # Table 6
    decoder_depth: int = 4
    decoder_dim: int | None = None          # None: the encoder's width
    decoder_heads: int | None = None        # None: the encoder's heads
    layer_scale: float | None = 0.1         # encoder (S, B: 0.1; L: 1e-5)
    decoder_layer_scale: float = 0.1        # regressor and decoder blocks (official decoder_layer_scale_init_value)

    def __post_init__(self):   # checked when the config is read
        if self.target not in ("tokens", "pixels"):
            raise ValueError(f"method.target must be tokens or pixels, not {self.target!r}")
        for key in ("regressor_depth", "decoder_depth"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.{key}={getattr(self, key)} is out of range: it must be 1 or more")
        if self.min_block_patches is not None and self.min_block_patches < 1:
            raise ValueError(f"method.min_block_patches={self.min_block_patches} is out of range: it must be 1 or more")


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, M, D] over keys/values [B, N, D] with q/v biases (the official
    layout: `q`, `k`, `v` without bias, `q_bias`, `v_bias`, `proj`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        b, m, d = query.shape
        h = self.num_heads

        def heads(x):
            return x.reshape(b, x.shape[1], h, d // h).transpose(1, 2)

        q = heads(F.linear(query, self.q.weight, self.q_bias))
        k = heads(self.k(key))
        v = heads(F.linear(value, self.v.weight, self.v_bias))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, m, d))


class RegressorBlock(nn.Module):
    """One block of the latent contextual regressor: queries attend to [Z_v, queries]; positions enter the
    query and key inputs, not the values; only the queries are updated."""

    def __init__(self, dim: int, num_heads: int, layer_scale: float, drop_path: float = 0.0):
        super().__init__()
        norm = lambda: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731
        self.norm1_q, self.norm1_k, self.norm1_v, self.norm2_cross = norm(), norm(), norm(), norm()
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp_cross = Mlp(dim, int(dim * 4.0))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        scale = layer_scale if layer_scale > 0 else 1.0
        self.gamma_1_cross = nn.Parameter(scale * torch.ones(dim), requires_grad=layer_scale > 0)
        self.gamma_2_cross = nn.Parameter(scale * torch.ones(dim), requires_grad=layer_scale > 0)

    def forward(self, queries, keys_values, pos_q, pos_kv):
        attended = self.cross_attn(self.norm1_q(queries + pos_q), self.norm1_k(keys_values + pos_kv),
                                   self.norm1_v(keys_values))
        x = self.norm2_cross(queries + self.drop_path(self.gamma_1_cross * attended))
        return x + self.drop_path(self.gamma_2_cross * self.mlp_cross(x))


class LatentRegressor(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, layer_scale: float, drop_path: float = 0.0):
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList([RegressorBlock(dim, num_heads, layer_scale, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, queries, z_visible, pos_masked, pos_visible):
        """queries [B, M, D] (mask queries), z_visible [B, K, D] (never updated) -> Z_m [B, M, D]."""
        pos_kv = torch.cat([pos_visible, pos_masked], dim=1)
        for block in self.blocks:
            queries = block(queries, torch.cat([z_visible, queries], dim=1), pos_masked, pos_kv)
        return self.norm(queries)


class CAEDecoder(nn.Module):
    """Self-attention blocks over the masked positions only, then LayerNorm and a linear layer; with
    `depth=0` (Table 2 "no decoder") the linear layer alone, on Z_m."""

    def __init__(self, dim: int, depth: int, num_heads: int, out_dim: int, layer_scale: float, drop_path: float = 0.0):
        super().__init__()
        rates = torch.linspace(0, drop_path, max(depth, 1)).tolist()
        self.blocks = nn.ModuleList([Block(dim, num_heads, 4.0, qkv_bias=True, init_values=layer_scale or None,
                                           drop_path=rates[i], norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6) if depth else nn.Identity()
        self.head = nn.Linear(dim, out_dim)

    def forward(self, z_masked: torch.Tensor, pos_masked: torch.Tensor) -> torch.Tensor:
        if not len(self.blocks):
            return self.head(z_masked)
        x = z_masked + pos_masked
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class CAE(Method):
    options = CAEOptions
    archs = ("vit",)
    clip_scope = "stage"        # the official (BEiT-based) code clips one global norm over all parameters
    no_weight_decay_keys = ("pos_embed",)   # fixed anyway; the official optimizer exempts only biases and 1-D
                                            # parameters, so the CLS token and mask query decay (furnace/optim_factory)

    def __init__(self, cfg: Config, in_chans: int, opts: CAEOptions | None = None):
        super().__init__()
        self.opts = o = opts or method_options(cfg)
        if cfg.model.arch != "vit":
            raise ValueError("CAE needs model.arch=vit (its encoder sees only the visible patches)")
        # registered as `encoder` so a run's keys are `encoder.model.*`, as every layout reader expects
        self._modules["encoder"] = build_backbone(cfg.model, in_chans, mask_token=False, init_values=o.layer_scale,
                                                  sincos_rows_first=True)
        enc = self.encoder
        dim = o.decoder_dim or enc.embed_dim
        heads = o.decoder_heads or enc.model.blocks[0].attn.num_heads
        self.grid, self.patch_size, self.in_chans = enc.grid, enc.patch_size, in_chans
        self.num_masked = int(round(enc.num_patches * o.mask_ratio))
        if not 0 < self.num_masked < enc.num_patches:
            raise ValueError(f"method.mask_ratio={o.mask_ratio} masks {self.num_masked} of {enc.num_patches} patches; "
                             f"choose a ratio that leaves some masked and some visible")
        self.min_block = o.min_block_patches or beit_min_block(enc.num_patches)
        if dim != enc.embed_dim:
            self.encoder_to_regressor = nn.Sequential(nn.Linear(enc.embed_dim, dim), nn.LayerNorm(dim, eps=1e-6))
        else:
            self.encoder_to_regressor = None
        self.rd_pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, self.grid, True, rows_first=True), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        drop_path = cfg.model.drop_path
        self.regressor = LatentRegressor(dim, o.regressor_depth, heads, o.decoder_layer_scale, drop_path)
        if o.target == "tokens":
            tokenizer = self.attach_tokenizer(cfg, in_chans, self.grid)
            out_dim = tokenizer.vocab_size
        else:
            out_dim = self.patch_size[0] * self.patch_size[1] * in_chans
        self.decoder = CAEDecoder(dim, o.decoder_depth if o.decoder else 0, heads, out_dim, o.decoder_layer_scale,
                                  drop_path)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init (modeling_cae.py: its `self.apply(self._init_weights)` runs after the parts' own): every
        Linear, the encoder's and the decoder head included, xavier-uniform with zero biases; LayerNorms 1 / 0; the
        patch embedding, CLS token and mask query trunc-normal 0.02 cut at one std (its `trunc_normal_` helper)."""
        init_xavier_linears(self)
        vit = self.encoder.model
        for tensor in (vit.patch_embed.proj.weight, vit.cls_token, self.mask_token):
            nn.init.trunc_normal_(tensor, std=0.02, a=-0.02, b=0.02)
        if vit.patch_embed.proj.bias is not None:
            nn.init.zeros_(vit.patch_embed.proj.bias)

    @classmethod
    def inert_options(cls, o) -> list[tuple[str, str]]:
        rules = [("norm_pix_loss", o.target != "pixels", "with method.target=tokens"),
                 ("decoder_depth", not o.decoder, "with method.decoder=false (a linear layer on Z_m)"),
                 ("alignment_weight", not o.alignment, "with method.alignment=false")]
        return [(key, why) for key, inert, why in rules if inert]

    @property
    def encoder(self):
        return self._modules["encoder"]

    # ------------------------------------------------------------------ pieces
    def mask(self, images: torch.Tensor) -> torch.Tensor:
        return block_mask(images.shape[0], self.grid, self.num_masked / (self.grid[0] * self.grid[1]), images.device,
                          min_block=self.min_block)

    def encode(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """F on the patches at `ids` [B, K] -> their representations [B, K, D_regressor] (CLS dropped)."""
        z = self.encoder.forward_visible(images, ids)[:, 1:]
        return self.encoder_to_regressor(z) if self.encoder_to_regressor is not None else z

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        """Everything a loss or a picture needs: ids, Z_v, Z_m, the decoder's predictions [B, M, out]."""
        b, num_patches = mask.shape
        ids_visible = visible_indices(mask, num_patches - self.num_masked)
        ids_masked = visible_indices(~mask, self.num_masked)                      # ascending, as the official code
        z_visible = self.encode(images, ids_visible)
        pos = self.rd_pos_embed[:, 1:].expand(b, -1, -1).to(z_visible.dtype)
        pos_visible, pos_masked = gather_tokens(pos, ids_visible), gather_tokens(pos, ids_masked)
        queries = self.mask_token.to(z_visible.dtype).expand(b, self.num_masked, -1)
        z_masked = self.regressor(queries, z_visible, pos_masked, pos_visible)
        return {"ids_visible": ids_visible, "ids_masked": ids_masked, "z_visible": z_visible, "z_masked": z_masked,
                "prediction": self.decoder(z_masked, pos_masked)}

    # ------------------------------------------------------------------ loss
    def forward(self, images: torch.Tensor, stage: str = "model", carry: dict | None = None) -> dict:
        o = self.opts
        mask = self.mask(images)
        out = self.predict(images, mask)
        prediction, ids_masked = out["prediction"], out["ids_masked"]
        if o.target == "tokens":
            labels = torch.gather(self.token_ids(images), 1, ids_masked)                          # [B, M]
            loss_y = F.cross_entropy(prediction.float().flatten(0, 1), labels.flatten())
            parts = {"loss_tokens": loss_y,
                     "token_accuracy": (prediction.detach().argmax(-1) == labels).float().mean()}
        else:
            target = gather_tokens(patch_pixels(images, self.patch_size, normalize=o.norm_pix_loss), ids_masked)
            loss_y = (prediction.float() - target.float()).pow(2).mean()
            parts = {"loss_pixels": loss_y}
        total = loss_y
        if o.alignment:
            with torch.no_grad():
                target_z = self.encode(images, ids_masked)                                         # sg[Z-_m]
            parts["loss_align"] = loss_z = F.mse_loss(out["z_masked"].float(), target_z.float())
            total = total + o.alignment_weight * loss_z                                            # Eq. 1
        return {"loss": total, "parts": parts}

    # ------------------------------------------------------------------ pictures and weights
    @torch.no_grad()
    def reconstruction_rows(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """original | masked | reconstruction: predicted pixels (un-normalised with the true patch statistics) or
        the tokenizer's decoding of the true tokens with the predicted ones at the masked positions."""
        mask = self.mask(images)
        out = self.predict(images, mask)
        keep = 1 - mask_to_pixels(mask, self.patch_size, self.grid).to(images.dtype)
        if self.opts.target == "tokens":
            ids = self.token_ids(images).scatter(1, out["ids_masked"], out["prediction"].argmax(-1))
            recon = self.images_from_ids(ids, images)
        else:
            real = patchify(images, self.patch_size)
            pred = out["prediction"].to(real.dtype)
            if self.opts.norm_pix_loss:
                pred = unnormalize_patches(pred, gather_tokens(real, out["ids_masked"]))
            index = out["ids_masked"].unsqueeze(-1).expand(-1, -1, real.shape[-1])
            recon = unpatchify(real.scatter(1, index, pred), self.patch_size, self.grid, self.in_chans)
        return [("original", images), ("masked", images * keep), ("reconstruction", images * keep + recon * (1 - keep))]

    def pretrained_parts(self, state_dict: dict) -> list:
        """`--init FILE`: the encoder from any supported checkpoint (official CAE: `encoder.*`, BEiT-style); from an
        official CAE file or a mimkit CAE run also the regressor (blocks, norm, mask query, projection) and the
        decoder. A decoder head of another shape (the file's 8192-token vocabulary into a pixel target or another
        tokenizer) is left at init and named in the report."""
        from mimkit.pretrained import Part, encoder_state
        parts = [Part("encoder", self.encoder, encoder_state(state_dict, self.encoder))]
        rest = official_cae_rest(state_dict) if "regresser.norm.weight" in state_dict else {
            k: v for k, v in state_dict.items() if k.startswith(self.REGRESSOR_KEYS + ("decoder.",))}
        if rest:
            regressor = {k: v for k, v in rest.items() if k.startswith(self.REGRESSOR_KEYS)}
            decoder = {k: v for k, v in rest.items() if k.startswith("decoder.")}
            parts += [Part("regressor", self, regressor, required=False, prefixes=self.REGRESSOR_KEYS),
                      Part("decoder", self, decoder, required=False, prefixes=("decoder.",),
                           reshaped_ok=("decoder.head.",))]
        return parts

    @classmethod
    def encoder_only_options(cls, options: dict) -> dict:
        """The same encoder without a tokenizer file: a pixel target (probing weights needs no tokenizer)."""
        return {**options, "target": "pixels"}

    REGRESSOR_KEYS = ("regressor.", "mask_token", "encoder_to_regressor.")


def official_cae_rest(state: dict) -> dict:
    """Atten4Vis/CAE's regressor, decoder, mask query and projection in mimkit's keys (the decoder's BEiT-style
    blocks become timm Blocks; `rd_pos_embed` is the fixed table mimkit builds itself)."""
    from mimkit.pretrained import simmim_vit_to_timm
    out = {}
    for key, value in state.items():
        if key.startswith("regresser.regressor_blocks."):
            out["regressor.blocks." + key[len("regresser.regressor_blocks."):]] = value
        elif key.startswith("regresser.norm."):
            out["regressor." + key[len("regresser."):]] = value
        elif key == "mask_token":
            out[key] = value
        elif key.startswith("encoder_to_regresser_norm."):
            out["encoder_to_regressor.1." + key.split(".", 1)[1]] = value
        elif key.startswith("encoder_to_regresser."):
            out["encoder_to_regressor.0." + key.split(".", 1)[1]] = value
    decoder = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    blocks = simmim_vit_to_timm({k[len("decoder_blocks."):]: v for k, v in decoder.items() if k.startswith("decoder_blocks.")})
    out.update({f"decoder.blocks.{k}": v for k, v in blocks.items()})
    out.update({f"decoder.{k}": v for k, v in decoder.items() if k.startswith(("norm.", "head."))})
    return out
