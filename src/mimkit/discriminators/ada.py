"""Adaptive discriminator augmentation (ADA; Karras et al., "Training Generative Adversarial Networks with Limited
Data", 2020) for Perceptual MAE's StyleGANv2-ADA-P (shared/papers/003_60891aaf38b668c1.txt, Sec. 3.2): every image
the critic sees, real or reconstructed, is augmented with probability p per operation, and p follows the critic's
over-fitting heuristic r_t = E[sign(D(real) - midpoint)] towards a target (0.6).

Operations (ADA's "bgc" subset plus cutout), each applied to an image with probability p:
  xflip (then a fair coin), rot90 (k uniform in 0..3; 0 or 2 for non-square images), integer translation (uniform
  up to `translate` of the image size, mirrored borders), brightness (+N(0, 0.2)), contrast (x 2^N(0, 0.5)),
  saturation (RGB only: chroma around the channel mean x 2^N(0, 1)), cutout (a square of half the image side
  zeroed). Brightness and contrast act about 0, which is the data mean for mimkit's normalised images (ADA's images
  in [-1, 1] have mid-grey at 0).
Multi-scale critics see one image at several scales: one draw of parameters is applied to every scale, with
translations and cutout snapped to the coarsest scale's pixel grid, so that each scale's augmented image is exactly
the average-pooled augmented full-scale image. Within a step the same draw is used for the real and the
reconstructed image of each index, so Eq. 3's feature matching compares like with like; every operation is
differentiable with respect to the image (gathers, selects, products), so the generator learns through it.

Why not kornia: its parameters are pixel coordinates of one image size (translations, erase boxes), and these
augmentations must be replayed on S image sizes at once; the transforms above are a few tensor ops each.

p update (ADA Sec. 3): every `interval` steps, p <- clip(p + sign(r_t - target) * N / (kimg * 1000), 0, 1) with N
the images observed since the last update (so p can cross [0, 1] in `kimg` thousand images); r_t and N are summed
over processes. ADA reads sign(D(x)) of a logistic critic, whose boundary is 0; mimkit's critics are trained with
LS-GAN targets 1 (real) and 0 (reconstructed), so the boundary (`midpoint`) is 0.5.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mimkit import keyed_random as draws

OPS = ("xflip", "rot90", "translate", "brightness", "contrast", "saturation", "cutout")


def _mirror(index: torch.Tensor, size: int) -> torch.Tensor:
    """Symmetric mirroring of out-of-range indices (-1 -> 0, size -> size-1): pooling commutes with it on aligned
    blocks."""
    m = index.remainder(2 * size)
    return torch.where(m < size, m, 2 * size - 1 - m)


class AdaptiveAugment(nn.Module):
    def __init__(self, target: float = 0.6, interval: int = 4, kimg: float = 500.0, p: float = 0.0,
                 ops: tuple[str, ...] = OPS, translate: float = 0.125, brightness: float = 0.2,
                 contrast: float = 0.5, saturation: float = 1.0, cutout: float = 0.5):
        super().__init__()
        unknown = set(ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown augmentation {sorted(unknown)}; choose from {', '.join(OPS)}")
        self.target, self.interval, self.kimg, self.ops = target, interval, kimg, tuple(ops)
        self.translate, self.brightness, self.contrast = translate, brightness, contrast
        self.saturation, self.cutout = saturation, cutout
        self.register_buffer("p", torch.tensor(float(p)))
        self.register_buffer("stats", torch.zeros(2))        # [sum of signs, images] since the last update

    # ------------------------------------------------------------------ parameters and application
    def sample(self, batch: int, coarse_size: tuple[int, int], device) -> dict:
        """One draw per image; geometry in the coarsest scale's pixels (`coarse_size`)."""
        hc, wc = coarse_size
        on = lambda: draws.rand(batch, device=device) < self.p   # noqa: E731  (each op its own coin)
        zero = torch.zeros(batch, device=device)
        draw = {}
        draw["xflip"] = on() & (draws.rand(batch, device=device) < 0.5) if "xflip" in self.ops else zero.bool()
        k = draws.randint(4, batch, device=device) * (1 if hc == wc else 2) % 4
        draw["rot90"] = torch.where(on(), k, 0) if "rot90" in self.ops else zero.long()
        if "translate" in self.ops:
            t = (draws.rand(batch, 2, device=device).T * 2 - 1) * self.translate
            t = torch.round(t * torch.tensor([[hc], [wc]], device=device)).long()
            draw["translate"] = torch.where(on(), t, 0)
        else:
            draw["translate"] = torch.zeros(2, batch, dtype=torch.long, device=device)
        draw["brightness"] = torch.where(on(), draws.randn(batch, device=device) * self.brightness, 0) \
            if "brightness" in self.ops else zero
        draw["contrast"] = torch.where(on(), torch.exp2(draws.randn(batch, device=device) * self.contrast), 1) \
            if "contrast" in self.ops else zero + 1
        draw["saturation"] = torch.where(on(), torch.exp2(draws.randn(batch, device=device) * self.saturation), 1) \
            if "saturation" in self.ops else zero + 1
        size = torch.tensor([max(1, round(self.cutout * hc)), max(1, round(self.cutout * wc))], device=device)
        corner = torch.round(draws.rand(batch, 2, device=device).T * torch.tensor([[hc], [wc]], device=device)
                             - size[:, None] / 2).long()
        draw["cutout"] = on() if "cutout" in self.ops else zero.bool()
        draw["cutout_box"] = torch.cat([corner, corner + size[:, None]])        # [4, B]: y0, x0, y1, x1 (coarse px)
        draw["coarse_size"] = (hc, wc)
        return draw

    def forward(self, images: torch.Tensor, draw: dict) -> torch.Tensor:
        """Augment one scale [B, C, h, w] (h / coarse h = w / coarse w = a power of 2) with the draw."""
        b, c, h, w = images.shape
        f = h // draw["coarse_size"][0]
        x = torch.where(draw["xflip"][:, None, None, None], images.flip(-1), images)
        if h == w:
            x = torch.stack([torch.rot90(x, k, (-2, -1)) for k in range(4)])           # [4, B, C, h, w]
            x = x.gather(0, draw["rot90"].view(1, b, 1, 1, 1).expand(1, b, c, h, w))[0]
        else:
            x = torch.where((draw["rot90"] == 2)[:, None, None, None], x.flip(-1).flip(-2), x)
        ty, tx = draw["translate"] * f
        rows = _mirror(torch.arange(h, device=x.device)[None] - ty[:, None], h)       # [B, h]
        cols = _mirror(torch.arange(w, device=x.device)[None] - tx[:, None], w)       # [B, w]
        x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w)).gather(3, cols[:, None, None, :].expand(b, c, h, w))
        x = (x + draw["brightness"].view(b, 1, 1, 1).to(x.dtype)) * draw["contrast"].view(b, 1, 1, 1).to(x.dtype)
        if c == 3:
            mean = x.mean(dim=1, keepdim=True)
            x = mean + (x - mean) * draw["saturation"].view(b, 1, 1, 1).to(x.dtype)
        y0, x0, y1, x1 = draw["cutout_box"] * f
        iy, ix = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
        inside = ((iy >= y0[:, None]) & (iy < y1[:, None]))[:, :, None] & ((ix >= x0[:, None]) & (ix < x1[:, None]))[:, None]
        return x * (1 - (inside & draw["cutout"][:, None, None]).to(x.dtype)[:, None])

    def pyramid(self, pyramid: list[torch.Tensor], draw: dict) -> list[torch.Tensor]:
        return [self(image, draw) for image in pyramid]

    # ------------------------------------------------------------------ the heuristic
    @torch.no_grad()
    def observe(self, real_logits: torch.Tensor, midpoint: float = 0.5) -> torch.Tensor:
        """Add a batch of D's outputs on (augmented) reals to r_t's running sums; returns the batch's mean sign."""
        signs = torch.sign(real_logits.detach().float().reshape(real_logits.shape[0], -1).mean(1) - midpoint)
        self.stats += torch.stack([signs.sum(), torch.tensor(float(signs.numel()), device=signs.device)])
        return signs.mean()

    @torch.no_grad()
    def adjust(self) -> None:
        """p += sign(r_t - target) * images / (kimg * 1000), clipped to [0, 1]; the sums restart."""
        stats = self.stats.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        r_t = stats[0] / stats[1].clamp(min=1)
        step = torch.sign(r_t - self.target) * stats[1] / (self.kimg * 1000)
        self.p.copy_((self.p + step).clamp(0, 1))
        self.stats.zero_()

    def extra_repr(self) -> str:
        return f"target={self.target}, interval={self.interval}, kimg={self.kimg}, ops={','.join(self.ops)}"
