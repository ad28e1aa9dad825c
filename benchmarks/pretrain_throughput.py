"""Pre-training throughput and peak memory of one engine step (forward, backward, clip, fused AdamW).

    python benchmarks/pretrain_throughput.py --config configs/mae_vit-b16_in1k-800e.yaml --batch 256

Prints a table: eager and torch.compile, images/s and peak GPU memory. Images are made on the device,
so the numbers measure the model and the engine, not the data loader.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mimkit.config import load_config
from mimkit.engine.trainer import Trainer


def measure(config: str, batch: int, compile_model: bool, steps: int, warmup: int, overrides: list[str]) -> dict:
    cfg = load_config(config, overrides + [f"data.batch_size={batch}", "train.accum_steps=1",
                                           f"train.compile={str(compile_model).lower()}",
                                           "train.sample_every=0", "data.num_workers=0"])
    h, w = cfg.model.img_size
    cfg.data.spec = f"synthetic:3x{h}x{w}"
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, quiet=True)
        dev = trainer.device
        images = [torch.randn(batch, 3, h, w, device=dev)]
        for scheduler in trainer.schedulers.values():
            scheduler.step_update(trainer.warmup_steps)
        running: dict = {}
        counts: dict = {}
        start = time.perf_counter()
        for _ in range(warmup):
            trainer._step(images, running, counts, trainer.warmup_steps)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            trainer._step(images, running, counts, trainer.warmup_steps)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        loss = float(running["loss"]) / (warmup + steps)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")
    return {"mode": "compiled" if compile_model else "eager", "img_per_s": steps * batch / elapsed,
            "step_ms": 1000 * elapsed / steps, "peak_gib": peak, "warmup_s": first, "mean_loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mae_vit-b16_in1k-800e.yaml")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# {args.config}, batch {args.batch}, {dev}, torch {torch.__version__}, "
          f"precision {'bf16 autocast' if torch.cuda.is_available() else 'fp32'}")
    print("| mode | images/s | step (ms) | peak memory (GiB) | warm-up incl. compile (s) |")
    print("|---|---|---|---|---|")
    for mode in args.modes.split(","):
        r = measure(args.config, args.batch, mode == "compiled", args.steps, args.warmup, args.overrides)
        print(f"| {r['mode']} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {r['warmup_s']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
