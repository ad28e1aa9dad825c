"""Perceptual MAE's cost per variant, device-independent (Table 4 of the paper: relative time per epoch MAE 0.23,
LS-GAN-P 0.54, StyleGANv2-ADA-P 1; parameters 113M, 113M, 119M).

    python benchmarks/perceptual_mae_cost.py [--size base] [--img 224] [--batch 2]

Prints parameters (generator, critic) and training FLOPs per image (forward + backward of every stage, counted by
torch.utils.flop_counter on the CPU) on a perceptual epoch. For StyleGANv2-ADA-P the lazy regularisers are amortised:
(R1 + path length) on 1 step in 16, path length alone on 3, neither on 12.
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
    print(f"ViT-{args.size} at {args.img} px, batch {args.batch}, FLOPs per image of one training step (perceptual epoch)")
    print(f"{'variant':28s} {'generator':>10s} {'critic':>8s} {'GFLOPs/img':>11s} {'x MSE':>6s}")
    base = None
    for name, extra in VARIANTS.items():
        loss = name.split(" ")[0]
        cfg = load_config(f"configs/perceptual-mae-{loss}_vit-b16_in1k-300e.yaml",
                          extra + [f"model.size={args.size}", f"model.img_size=[{args.img},{args.img}]"])
        torch.manual_seed(0)
        method = build_method(cfg, 3)
        count = lambda step: flops_per_image(cfg, 3, args.batch, step, method)   # noqa: E731
        if loss == "stylegan2-ada-p":      # R1 + path length on step 0, path length alone on 4, 8, 12
            flops = (count(0) + 3 * count(4) + 12 * count(1)) / 16
        else:
            flops = count(1)
        base = base or flops
        gen = sum(p.numel() for p in method.generator.parameters()) / 1e6
        critic = sum(p.numel() for p in method.critic.parameters()) / 1e6 if hasattr(method, "critic") else 0.0
        print(f"{name:28s} {gen:9.1f}M {critic:7.1f}M {flops / 1e9:11.1f} {flops / base:6.2f}")


if __name__ == "__main__":
    main()
