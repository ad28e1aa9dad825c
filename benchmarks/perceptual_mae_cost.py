"""Perceptual MAE's cost per variant, device-independent (Table 4 of the paper: relative time per epoch MAE 0.23,
LS-GAN-P 0.54, StyleGANv2-ADA-P 1; parameters 113M, 113M, 119M).

    python benchmarks/perceptual_mae_cost.py [--size base] [--img 224] [--batch 2]

Prints parameters (generator, critic) and training FLOPs per image (forward + backward of every stage, counted by
torch.utils.flop_counter on the CPU): the mean over the schedule (`engine.cost.flops_per_image`: the perceptual term
on even epochs only, and for StyleGANv2-ADA-P lazy R1 on 1 step in 16 and path length on 1 in 4 of the perceptual
epochs), and one step of a perceptual epoch without the lazy regularisers.
"""
from __future__ import annotations

import argparse

import torch
from mimkit.config import load_config
from mimkit.engine.cost import flops_per_image
from mimkit.methods import build_method

VARIANTS = {
    "mse": [], "lsgan-p": [],
    "msg-gan-p": [],
    "stylegan2-ada-p": [],
    "stylegan2-ada-p (MAE arch)": ["method.msg_mae=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"ViT-{args.size} at {args.img} px, batch {args.batch}, training FLOPs per image and step")
    print(f"{'variant':28s} {'generator':>10s} {'critic':>8s} {'GFLOPs mean':>12s} {'x MSE':>6s} {'perceptual step':>16s}")
    base = None
    for name, extra in VARIANTS.items():
        loss = name.split(" ")[0]
        cfg = load_config(f"configs/perceptual-mae-{loss}_vit-b16_in1k-300e.yaml",
                          extra + [f"model.size={args.size}", f"model.img_size=[{args.img},{args.img}]"])
        torch.manual_seed(0)
        method = build_method(cfg, 3)
        mean = flops_per_image(cfg, 3, args.batch, method=method)
        perceptual = flops_per_image(cfg, 3, args.batch, step=1, epoch=1, method=method)
        base = base or mean
        gen = sum(p.numel() for p in method.generator.parameters()) / 1e6
        critic = sum(p.numel() for p in method.critic.parameters()) / 1e6 if hasattr(method, "critic") else 0.0
        print(f"{name:28s} {gen:9.1f}M {critic:7.1f}M {mean / 1e9:12.1f} {mean / base:6.2f} {perceptual / 1e9:16.1f}",
              flush=True)

if __name__ == "__main__":
    main()
