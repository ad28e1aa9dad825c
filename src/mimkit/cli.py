"""Command line: `mimkit pretrain | eval knn | eval linear | export | demo`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="RUN/last.pt or an export (FILE.safetensors)")
    p.add_argument("--config", help="recipe, with --init or --random-init")
    p.add_argument("--init", help="weights file (official MAE/SimMIM release or mimkit run) to probe")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
    p.add_argument("--raw-pixels", action="store_true", help="baseline: normalised pixels as features")
    p.add_argument("--data", default="fashion-mnist", help="labelled dataset with a train and a test split")
    p.add_argument("--pool", choices=["cls", "mean"], help="override the run's pooling")
    p.add_argument("--train-limit", type=int, default=None, help="use a seeded subset of the train split")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (with --config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train an encoder")
    p.add_argument("--config", help="recipe YAML from configs/ (default: the run's config.yaml with --resume)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data", help="fashion-mnist | idx:DIR | folder:DIR")
    p.add_argument("--steps", type=int, help="total optimiser steps (overrides train.epochs)")
    p.add_argument("--ckpt-every", type=int, help="write RUN/last.pt every N steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    p.add_argument("--init", help="initial weights: official MAE/SimMIM release or a mimkit run")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.log_every=1")

    p = sub.add_parser("eval", help="evaluate an encoder")
    evsub = p.add_subparsers(dest="protocol", required=True)
    knn = evsub.add_parser("knn", help="k-NN top-1 on frozen features")
    _add_probe_args(knn)
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--vote", choices=["weighted", "majority"], default="weighted")
    lin = evsub.add_parser("linear", help="linear probe (BatchNorm without affine + linear) on frozen features")
    _add_probe_args(lin)
    lin.add_argument("--epochs", type=int, default=30)
    lin.add_argument("--lr", type=float, default=0.1)

    p = sub.add_parser("export", help="write the encoder as a timm state dict (safetensors) + JSON")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True, help="FILE: writes FILE.safetensors and FILE.json")

    p = sub.add_parser("demo", help="pre-train tiny Vision ELECTRA and MAE on Fashion-MNIST, probe them, write RUN/report.md")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=None, help="recipe (default: Vision ELECTRA, compared with MAE)")
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the recipe's)")
    p.add_argument("--train-limit", type=int, default=10000, help="train images used by the probes")
    p.add_argument("--device", default=None)
    return parser


def cmd_pretrain(args) -> None:
    from pathlib import Path

    from mimkit.config import load_config
    from mimkit.engine.trainer import Trainer
    from mimkit.engine import dist as D

    config = args.config
    if config is None:
        saved = Path(args.out) / "config.yaml"
        if not (args.resume and saved.exists()):
            raise SystemExit("mimkit: error: pass --config configs/X.yaml (or --resume an existing run)")
        config = saved
    extra = list(args.overrides)
    if args.data:
        extra.append(f"data.spec={args.data}")
    if args.steps is not None:
        extra.append(f"train.steps={args.steps}")
    if args.ckpt_every is not None:
        extra.append(f"train.ckpt_every={args.ckpt_every}")
    if args.seed is not None:
        extra.append(f"train.seed={args.seed}")
    cfg = load_config(config, extra)
    trainer = Trainer(cfg, args.out, resume=args.resume, init=args.init, device=args.device)
    start = time.time()
    row = trainer.train()
    if trainer.dist.is_main:
        print(json.dumps({"run": str(args.out), "step": trainer.total_steps, "loss": row.get("loss"),
                          "wall_s": round(time.time() - start, 1)}))
    D.shutdown()


def run_probe(args, protocol: str) -> dict:
    import torch

    from mimkit.data import build_dataset
    from mimkit.eval import extract_features, knn_top1, linear_probe_top1
    from mimkit.eval.encoders import probe_subject
    from mimkit.eval.features import labels_of, subset

    train_set = build_dataset(args.data, "train")
    test_set = build_dataset(args.data, "test")
    subject = probe_subject(args.ckpt, args.config, args.init, args.random_init, args.raw_pixels, args.overrides,
                            in_chans=train_set.channels, seed=args.seed)
    mean = subject.mean or train_set.mean
    std = subject.std or train_set.std
    size = subject.img_size or list(train_set[0][0].shape[-2:])
    pool = args.pool or subject.pool
    device = args.device or os.environ.get("MIMKIT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    train_part, test_part = subset(train_set, args.train_limit, args.seed), subset(test_set, args.test_limit, args.seed)
    if labels_of(train_part).min() < 0:
        raise SystemExit(f"mimkit: error: {args.data} is unlabelled; probes need class sub-folders")
    start = time.time()
    tr_f, tr_y = extract_features(subject.model, train_part, size, mean, std, pool, args.batch_size, device)
    te_f, te_y = extract_features(subject.model, test_part, size, mean, std, pool, args.batch_size, device)
    if protocol == "knn":
        top1 = knn_top1(tr_f, tr_y, te_f, te_y, k=args.k, vote=args.vote)
        extra = {"k": args.k, "vote": args.vote}
    else:
        top1 = linear_probe_top1(tr_f, tr_y, te_f, te_y, epochs=args.epochs, lr=args.lr, seed=args.seed)
        extra = {"epochs": args.epochs, "lr": args.lr}
    return {"protocol": protocol, "top1": round(top1, 2), "encoder": subject.description, "pool": pool,
            "feature_dim": tr_f.shape[1], "n_train": len(tr_y), "n_test": len(te_y), **extra,
            "wall_s": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mimkit.config import ConfigError
    from mimkit.data import DataError
    from mimkit.engine.checkpoint import CheckpointError
    from mimkit.engine.trainer import TrainingDiverged
    from mimkit.methods.base import CheckpointMismatch

    # ValueError: a setting the model can't take (a mask size, a size name); MIMKIT_DEBUG=1 shows the traceback
    known = (ConfigError, DataError, CheckpointError, CheckpointMismatch, TrainingDiverged, FileExistsError, ValueError)
    try:
        if args.command == "pretrain":
            cmd_pretrain(args)
        elif args.command == "eval":
            print(json.dumps(run_probe(args, args.protocol)))
        elif args.command == "export":
            from mimkit.export import export_encoder
            weights, meta = export_encoder(args.ckpt, args.out)
            print(json.dumps({"safetensors": str(weights), "json": str(meta)}))
        elif args.command == "demo":
            from mimkit.demo import run_demo
            run_demo(args.out, args.config, args.steps, args.train_limit, args.device)
    except known as err:
        if os.environ.get("MIMKIT_DEBUG"):
            raise
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
