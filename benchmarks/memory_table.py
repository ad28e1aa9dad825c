"""Per-rank memory estimate of the ViT-B/L recipes (`mimkit bench --modes none`'s table, one row per recipe and
setting), at each recipe's own per-device batch: parameters, gradients and AdamW state in fp32 (fsdp: sharded over
`--world` ranks) and the activations the autograd graph keeps (fp32; bf16 autocast halves most of them), without and
with activation checkpointing. Counted on the CPU, no GPU needed:  python benchmarks/memory_table.py"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mimkit.config import load_config
from mimkit.engine.cost import memory_estimate
from mimkit.methods import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = [  # (recipe, overrides): CAE's token recipes need DALL-E's file, so CAE runs with pixel targets at B/L
    ("mae_vit-b16_in1k-800e.yaml", []), ("simmim_vit-b16_in1k-800e.yaml", []),
    ("vision-electra_vit-b16_in1k-100e.yaml", []), ("gan-mae_vit-b16_in1k-300e.yaml", []),
    ("gan-mae_vit-l16_in1k-300e.yaml", []), ("perceptual-mae-lsgan-p_vit-b16_in1k-300e.yaml", []),
    ("perceptual-mae-lsgan-p_vit-l16_in1k-1600e.yaml", []),
    ("cae-pixels_vit-mini_fmnist-tiny.yaml", ["model.size=base", "model.img_size=[224,224]", "model.patch_size=16",
                                              "data.channels=3", "data.batch_size=64"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=8)
    args = parser.parse_args()
    print(f"| recipe | batch/rank | ddp | ddp + checkpointing | fsdp x{args.world} | fsdp x{args.world} + checkpointing |")
    print("|---|---|---|---|---|---|")
    for recipe, overrides in RECIPES:
        cfg = load_config(CONFIGS / recipe, overrides)
        in_chans = cfg.data.channels or 3
        torch.manual_seed(0)
        rows = memory_estimate(cfg, build_method(cfg, in_chans), in_chans, cfg.data.batch_size, args.world)
        cells = [f"{r['total']:.1f}" for r in rows]
        name = recipe if not overrides else f"{recipe} ({' '.join(overrides[:3])})"
        print(f"| {name} | {cfg.data.batch_size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
