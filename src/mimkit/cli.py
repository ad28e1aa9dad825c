"""Command line: `mimkit pretrain | eval {knn,linear,attentive,finetune,segment,detect,recon,robustness,report} | visualize attention
| export | tokenizer {train,eval,show,convert-dalle} | demo`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


class Parser(argparse.ArgumentParser):
    """argparse with the project's error form: one sentence, `mimkit: error: ...`, exit 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"mimkit: error: {message}; see '{self.prog} --help'\n")


def at_least(low: int):
    """An integer option's type: at least `low`, one sentence otherwise."""
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be at least {low}")
        return value
    return check


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is out of range: it must be positive")
    return value


def share(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: it must be in (0, 1]")
    return value


def severities(text: str) -> str:
    """A comma-separated list of corruption severities, each 1..5 (ImageNet-C's)."""
    parts = [t.strip() for t in text.split(",")]
    if not parts or not all(t.isdigit() and 1 <= int(t) <= 5 for t in parts):
        raise argparse.ArgumentTypeError(f"{text!r} must list severities from 1 to 5, e.g. 1,3,5")
    return text


def _add_dense_args(p, data_help: str, recipe_example: str, out_default: str) -> None:
    """The options `eval segment` and `eval detect` share: the encoder (as for the probes), data, recipe, run folder."""
    p.add_argument("--ckpt", help="RUN/last.pt (a train.checkpoint=dcp run: RUN) or an export (.safetensors)")
    p.add_argument("--config", help="recipe YAML of the encoder (with --init or --random-init)")
    p.add_argument("--init", help="weights file to transfer (with --config)")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--recipe", required=True, help=f"protocol, e.g. {recipe_example}")
    p.add_argument("--set", dest="recipe_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override")
    p.add_argument("--out", default=out_default, help="run folder: last.pt, metrics.jsonl, tb/, the picture")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--val-limit", type=at_least(1), default=None, help="score the first N validation images")
    p.add_argument("--normalise", choices=["checkpoint", "data"], default="checkpoint",
                   help="mean/std for the images: the encoder's pre-training data's (default) or --data's own")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=at_least(0), default=0, help="the random init's seed")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (with --config)")


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="RUN/last.pt (a train.checkpoint=dcp run: RUN) or an export (FILE.safetensors)")
    p.add_argument("--config", help="recipe, with --init or --random-init")
    p.add_argument("--init", help="weights file (official MAE/SimMIM release or mimkit run) to probe")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
    p.add_argument("--raw-pixels", action="store_true", help="baseline: normalised pixels as features")
    p.add_argument("--data", default="fashion-mnist", help="labelled dataset with a train and a test split")
    p.add_argument("--pool", choices=["cls", "mean"], help="override the run's pooling")
    p.add_argument("--normalise", choices=["checkpoint", "data"], default="checkpoint",
                   help="mean/std for the images: the run's pre-training data's (default) or --data's own")
    p.add_argument("--train-limit", type=at_least(1), default=None, help="use a seeded subset of the train split")
    p.add_argument("--test-limit", type=at_least(1), default=None)
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (with --config)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mimkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train an encoder")
    p.add_argument("--config", help="recipe YAML from configs/ (default: the run's config.yaml with --resume)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data", help="fashion-mnist | idx:DIR | folder:DIR")
    p.add_argument("--steps", type=at_least(1), help="total optimiser steps (overrides train.epochs)")
    p.add_argument("--ckpt-every", type=at_least(1), help="write RUN/last.pt every N steps")
    p.add_argument("--seed", type=at_least(0))
    p.add_argument("--online-probe", metavar="KINDS",
                   help="probe the encoder every train.probe_every steps: knn, linear (a quick probe), rankme (no "
                        "labels: RankMe and feature spread), comma-separated")
    p.add_argument("--probe-data", help="labelled data for the online probe (default: --data)")
    p.add_argument("--val-data", help="held-out images for the validation loss (or data.val_split=SHARE of --data)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    p.add_argument("--init", help="initial weights: official MAE/SimMIM release or a mimkit run")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.log_every=1")

    p = sub.add_parser("eval", help="evaluate an encoder")
    evsub = p.add_subparsers(dest="protocol", required=True)
    knn = evsub.add_parser("knn", help="k-NN top-1 on frozen features")
    _add_probe_args(knn)
    knn.add_argument("--k", type=at_least(1), default=20)
    knn.add_argument("--vote", choices=["weighted", "majority"], default="weighted")
    lin = evsub.add_parser("linear", help="linear probe (BatchNorm without affine + linear) on frozen features")
    _add_probe_args(lin)
    lin.add_argument("--epochs", type=at_least(1), default=30)
    lin.add_argument("--lr", type=positive_float, default=None, help="default 0.1 (sgd), 6.4 (lars, MAE/CAE)")
    lin.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd", help="lars: MAE/CAE's protocol")
    lin.add_argument("--probe-batch", type=at_least(1), default=1024)
    att = evsub.add_parser("attentive", help="attentive probe (CAE): cross-attention with its own class token")
    _add_probe_args(att)
    att.add_argument("--recipe", default=None, help="protocol (default configs/probe/attentive_cae-appendix-a.yaml: "
                     "CAE's Appendix A, 90 epochs on augmented batches; attentive_cpu-small.yaml: the report's)")
    att.add_argument("--set", dest="probe_overrides", action="append", default=[], help="recipe override key=value")
    att.add_argument("--epochs", type=at_least(1), default=None, help="the recipe's epochs (CAE: 90)")
    att.add_argument("--lr", type=positive_float, default=None, help="the recipe's lr at its lr_batch (CAE: 0.4 at 8192)")
    att.add_argument("--probe-batch", type=at_least(1), default=None, help="the recipe's batch (CAE: 8192)")
    ft = evsub.add_parser("finetune", help="end-to-end fine-tuning with layer-wise lr decay, mixup, RandAugment")
    _add_probe_args(ft)
    ft.add_argument("--recipe", default=None, help="fine-tuning recipe, e.g. configs/finetune/vit-b16_cim.yaml")
    ft.add_argument("--set", dest="ft_overrides", action="append", default=[], help="recipe override key=value")
    seg = evsub.add_parser("segment", help="semantic segmentation transfer: UperNet / linear / FCN head, mIoU")
    _add_dense_args(seg, "seg:DIR: ADE20K's layout or the generic one (classes.json)",
                    "configs/segment/upernet_vit-b16_ade20k-160k.yaml", "runs/segment")
    seg.add_argument("--head", choices=["upernet", "linear", "fcn"], help="the recipe's head unless given")
    seg.add_argument("--frozen", action="store_true", help="train the head only (with --head linear: the probe)")
    seg.add_argument("--steps", type=at_least(1), default=None, help="the recipe's iterations unless given")
    rec = evsub.add_parser("recon", help="L1, PSNR, SSIM, MS-SSIM (and FID/IS) of a run's reconstructions")
    rec.add_argument("--ckpt", required=True, help="RUN/last.pt (the whole method, not an export)")
    rec.add_argument("--data", default="fashion-mnist")
    rec.add_argument("--num-images", type=at_least(1), default=1000)
    rec.add_argument("--mask-seed", type=at_least(0), default=0)
    rec.add_argument("--inception-weights", help="local Inception-v3 weights file (torch-fidelity format) for FID/IS")
    rec.add_argument("--fid-encoder", help="else: a timm encoder export (.safetensors) as the FID feature network")
    rec.add_argument("--device", default=None)
    rob = evsub.add_parser("robustness", help="linear-probe accuracy under common corruptions; CE vs a baseline")
    rob.add_argument("--ckpt", required=True)
    rob.add_argument("--baseline", help="run whose errors normalise the corruption errors (default: --ckpt itself)")
    rob.add_argument("--data", default="fashion-mnist")
    rob.add_argument("--severities", type=severities, default="1,2,3,4,5")
    rob.add_argument("--train-limit", type=at_least(1), default=None)
    rob.add_argument("--test-limit", type=at_least(1), default=None)
    rob.add_argument("--device", default=None)
    det = evsub.add_parser("detect", help="object detection and instance segmentation transfer: Mask R-CNN, COCO AP")
    _add_dense_args(det, "coco:DIR: COCO's release layout or any COCO-format folder",
                    "configs/detect/maskrcnn_vit-b16_coco-1x.yaml", "runs/detect")
    det.add_argument("--steps", type=at_least(1), default=None, help="iterations (default: the recipe's epochs)")
    rep = evsub.add_parser("report", help="several runs x several protocols -> OUT/report.md + PNGs")
    rep.add_argument("runs", nargs="+", help="RUN dirs or checkpoints; 'random:RUN' = that architecture untrained")
    rep.add_argument("--out", help="report folder (default: FIRST_RUN/report)")
    rep.add_argument("--data", default="fashion-mnist")
    rep.add_argument("--protocols", default="knn,linear,attentive,recon,robustness")
    rep.add_argument("--train-limit", type=at_least(1), default=5000)
    rep.add_argument("--test-limit", type=at_least(1), default=2000)
    rep.add_argument("--severities", type=severities, default="1,3,5")
    rep.add_argument("--device", default=None)
    rep.add_argument("--inception-weights", help="recon: local Inception-v3 weights file for FID and IS (Table 1)")
    rep.add_argument("--fid-encoder", help="recon: else a timm encoder export (.safetensors) as FID's feature network")
    rep.add_argument("--finetune-recipe", help="finetune: a recipe, e.g. configs/finetune/fmnist-tiny.yaml (default: "
                     "3 epochs, batch 64, lr 1e-3, the ImageNet-strength mixup, cutmix and RandAugment)")
    rep.add_argument("--finetune-epochs", type=at_least(1), default=None, help="finetune: epochs (default: the recipe's)")
    rep.add_argument("--segment-data", help="segment: seg:DIR (e.g. from mimkit data make-segmentation)")
    rep.add_argument("--segment-recipe", help="segment: a recipe (default: configs/segment/"
                     "upernet_vit-mini_fmnist-canvas.yaml)")
    rep.add_argument("--segment-steps", type=at_least(1), default=None, help="segment: iterations (default: the recipe's)")
    rep.add_argument("--detect-data", help="detect: coco:DIR (e.g. from mimkit data make-detection)")
    rep.add_argument("--detect-recipe", help="detect: a recipe (default: configs/detect/"
                     "maskrcnn_vit-mini_fmnist-canvas.yaml)")
    rep.add_argument("--detect-steps", type=at_least(1), default=None, help="detect: iterations (default: the recipe's)")

    p = sub.add_parser("visualize", help="pictures of a run")
    vsub = p.add_subparsers(dest="what", required=True)
    va = vsub.add_parser("attention", help="last-layer CLS attention per head, overlaid on images (PNG)")
    va.add_argument("--ckpt", required=True, help="RUN/last.pt or an export")
    va.add_argument("--out", required=True, help="PNG file")
    va.add_argument("--data", default="fashion-mnist")
    va.add_argument("--num-images", type=at_least(1), default=8)
    vr = vsub.add_parser("reconstruction", help="original | masked | reconstruction (| the method's other rows), "
                         "titled (PNG)")
    vr.add_argument("--ckpt", required=True, help="RUN or RUN/last.pt (a mimkit run: the whole method is needed)")
    vr.add_argument("--out", required=True, help="PNG file")
    vr.add_argument("--data", default="fashion-mnist")
    vr.add_argument("--num-images", type=at_least(1), default=8)
    vr.add_argument("--seed", type=at_least(0), default=0, help="the masks' seed")

    p = sub.add_parser("export", help="write the encoder as a timm state dict (safetensors) + JSON")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True, help="FILE: writes FILE.safetensors and FILE.json")

    p = sub.add_parser("tokenizer", help="discrete image tokenizers: train, evaluate, show, convert DALL-E's")
    tsub = p.add_subparsers(dest="action", required=True)
    tt = tsub.add_parser("train", help="train a tokenizer (dVAE or VQ) on the pre-training engine")
    tt.add_argument("--config", help="recipe from configs/tokenizer/ (default: the run's config.yaml with --resume)")
    tt.add_argument("--out", required=True, help="run directory (RUN/last.pt is then a tokenizer path)")
    tt.add_argument("--data", help="fashion-mnist | idx:DIR | folder:DIR")
    tt.add_argument("--steps", type=at_least(1))
    tt.add_argument("--ckpt-every", type=at_least(1))
    tt.add_argument("--seed", type=at_least(0))
    tt.add_argument("--resume", action="store_true")
    tt.add_argument("--device", default=None)
    tt.add_argument("overrides", nargs="*", help="key=value config overrides")
    tt.set_defaults(init=None, online_probe=None, probe_data=None, val_data=None)   # pretrain's options a tokenizer run has not
    te = tsub.add_parser("eval", help="reconstruction PSNR/SSIM, codebook usage and perplexity (one JSON line)")
    te.add_argument("--tokenizer", required=True, help="RUN, RUN/last.pt or T.safetensors")
    te.add_argument("--data", default="fashion-mnist")
    te.add_argument("--split", default="test")
    te.add_argument("--num-images", type=at_least(1), default=2000)
    te.add_argument("--device", default=None)
    ts = tsub.add_parser("show", help="PNG: original | reconstruction | 50 %% of tokens resampled")
    ts.add_argument("--tokenizer", required=True)
    ts.add_argument("--out", required=True, help="PNG file")
    ts.add_argument("--data", default="fashion-mnist")
    ts.add_argument("--num-images", type=at_least(1), default=8)
    ts.add_argument("--ratio", type=share, default=0.5, help="share of tokens replaced by sampled ones")
    ts.add_argument("--seed", type=at_least(0), default=0)
    tc = tsub.add_parser("convert-dalle", help="OpenAI's DALL-E encoder.pkl + decoder.pkl -> T.safetensors")
    tc.add_argument("--encoder", required=True)
    tc.add_argument("--decoder", required=True)
    tc.add_argument("--out", required=True, help=".safetensors file")
    tc.add_argument("--trust-pickle", action="store_true", help="allow unpickling (runs code from the files)")

    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    pk = dsub.add_parser("pack", help="write an image folder as WebDataset tar shards + index.json")
    pk.add_argument("--data", required=True, help="folder:DIR (DIR/train if present)")
    pk.add_argument("--out", required=True, help="an empty folder for the shards")
    pk.add_argument("--shard-size", default="1GB", help="largest shard, e.g. 512MB, 1GB (default)")
    pk.add_argument("--channels", type=at_least(1), default=None, help="convert every image to this many channels")
    for name, what in (("make-segmentation", "a segmentation benchmark: Fashion-MNIST items on canvases, with "
                                              "per-pixel labels (seg:DIR)"),
                       ("make-detection", "a detection benchmark: the same canvases with a box and a mask per garment, "
                                          "as COCO-format JSON (coco:DIR)")):
        mk = dsub.add_parser(name, help=what)
        mk.add_argument("--out", required=True, help="a new folder")
        mk.add_argument("--data", default="fashion-mnist", help="the IDX set whose items are composed")
        mk.add_argument("--canvas", type=at_least(28), default=64, help="canvas side in pixels")
        mk.add_argument("--train-count", type=at_least(1), default=2000, help="training canvases (train items)")
        mk.add_argument("--val-count", type=at_least(1), default=500, help="validation canvases (test items)")
        mk.add_argument("--seed", type=at_least(0), default=0)

    p = sub.add_parser("bench", help="a recipe's cost here: parameters per part, FLOPs per image, images/s, memory")
    p.add_argument("--config", required=True, action="append", help="recipe YAML (repeat for several)")
    p.add_argument("--batch", type=at_least(1), default=None, help="images per step (default: the recipe's data.batch_size)")
    p.add_argument("--steps", type=at_least(1), default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled, checkpointed (eager with activation "
                   "checkpointing), comma-separated; none: the estimates only")
    p.add_argument("--world", type=at_least(1), default=8, help="ranks the fsdp memory estimate shards over")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")

    p = sub.add_parser("demo", help="tiny Vision ELECTRA, then MAE at equal steps and equal FLOPs, on Fashion-MNIST; "
                                    "probes; RUN/report.md after every stage")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=None, help="recipe (default: Vision ELECTRA, compared with MAE)")
    p.add_argument("--steps", type=at_least(1), default=None, help="pre-training steps (default: the recipe's)")
    p.add_argument("--train-limit", type=at_least(1), default=5000, help="train images used by the probes")
    p.add_argument("--device", default=None)
    return parser


def cmd_pretrain(args) -> None:
    from pathlib import Path

    from mimkit.config import ConfigError, load_config
    from mimkit.engine.trainer import Trainer
    from mimkit.engine import dist as D

    config = args.config
    if config is None:
        saved = Path(args.out) / "config.yaml"
        if not (args.resume and saved.exists()):
            raise ConfigError(f"{args.out} holds no run to resume (no config.yaml); pass --config configs/X.yaml to "
                              f"start one" if args.resume else "pass --config configs/X.yaml (or --resume an existing run)")
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
    if args.online_probe:
        extra.append(f"train.online_probe={args.online_probe}")
    if args.probe_data:
        extra.append(f"train.probe_data={args.probe_data}")
    if getattr(args, "val_data", None):
        extra.append(f"data.val_spec={args.val_data}")
    cfg = load_config(config, extra)
    trainer = Trainer(cfg, args.out, resume=args.resume, init=args.init, device=args.device)
    start = time.time()
    row = trainer.train()
    if trainer.dist.is_main:
        print(json.dumps({"run": str(args.out), "step": trainer.total_steps, "loss": row.get("loss"),
                          "wall_s": round(time.time() - start, 1)}))
    D.shutdown()


def run_tokenizer_command(args) -> None:
    from pathlib import Path

    from mimkit.data import build_dataset
    from mimkit.tokenizers import load_tokenizer
    if args.action == "train":
        from mimkit.config import load_config
        from mimkit.methods import TOKENIZER_METHODS
        config = args.config or Path(args.out) / "config.yaml"
        if Path(config).is_file() and load_config(config).method.get("name") not in TOKENIZER_METHODS:
            raise SystemExit(f"mimkit: error: {config} is not a tokenizer recipe (method.name one of "
                             f"{', '.join(TOKENIZER_METHODS)}); pick one from configs/tokenizer/")
        cmd_pretrain(args)
    elif args.action == "eval":
        from mimkit.tokenizers.evaluate import evaluate_tokenizer
        result = evaluate_tokenizer(load_tokenizer(args.tokenizer), build_dataset(args.data, args.split),
                                    args.num_images, device=default_device(args.device))
        print(json.dumps({"tokenizer": str(args.tokenizer), **result}))
    elif args.action == "show":
        from mimkit.tokenizers.evaluate import show_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
        out = show_tokenizer(tokenizer, build_dataset(args.data, "test"), args.out, args.num_images, args.seed,
                             args.ratio, name=f"{type(tokenizer).__name__} {args.tokenizer}")
        print(json.dumps({"png": str(out)}))
    else:
        from mimkit.tokenizers.dalle import convert_dalle
        out = convert_dalle(args.encoder, args.decoder, args.out, args.trust_pickle)
        print(json.dumps({"tokenizer": str(out)}))


def run_probe(args, protocol: str) -> dict:

    from mimkit.data import build_dataset
    from mimkit.eval import extract_features, knn_top1, linear_probe_top1
    from mimkit.eval.encoders import probe_subject
    from mimkit.eval.features import labels_of, subset

    train_set = build_dataset(args.data, "train")
    test_set = build_dataset(args.data, "test")
    subject = probe_subject(args.ckpt, args.config, args.init, args.random_init, args.raw_pixels, args.overrides,
                            in_chans=train_set.channels, seed=args.seed)
    use_data = args.normalise == "data" or subject.mean is None
    mean, std = (train_set.mean, train_set.std) if use_data else (subject.mean, subject.std)
    normalisation = {"from": "data" if use_data else "checkpoint", "mean": [round(v, 4) for v in mean],
                     "std": [round(v, 4) for v in std]}
    if not use_data and any(abs(a - b) > 0.02 for a, b in zip(mean + std, train_set.mean + train_set.std)):
        print(f"mimkit: probing {args.data} with the checkpoint's normalisation (mean {normalisation['mean']}, std "
              f"{normalisation['std']}), not this data's; --normalise data uses the data's own", file=sys.stderr)
    size = subject.img_size or list(train_set[0][0].shape[-2:])
    pool = args.pool or subject.pool
    device = default_device(args.device)
    train_part, test_part = subset(train_set, args.train_limit, args.seed), subset(test_set, args.test_limit, args.seed)
    if labels_of(train_part).min() < 0:
        raise SystemExit(f"mimkit: error: {args.data} is unlabelled; probes need class sub-folders")
    start = time.time()
    if protocol == "finetune":
        return run_finetune(args, subject, train_part, test_part, size, mean, std, device)
    if protocol == "attentive":
        return run_attentive(args, subject, train_part, test_part, size, mean, std, device, normalisation, start)
    tr_f, tr_y = extract_features(subject.model, train_part, size, mean, std, pool, args.batch_size, device)
    te_f, te_y = extract_features(subject.model, test_part, size, mean, std, pool, args.batch_size, device)
    if protocol == "knn":
        top1 = knn_top1(tr_f, tr_y, te_f, te_y, k=args.k, vote=args.vote)
        extra = {"k": args.k, "vote": args.vote}
    else:
        top1 = linear_probe_top1(tr_f, tr_y, te_f, te_y, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                                 batch_size=args.probe_batch, seed=args.seed)
        extra = {"epochs": args.epochs, "optimizer": args.optimizer}
    return {"protocol": protocol, "top1": round(top1, 2), "encoder": subject.description, "pool": pool,
            "normalisation": normalisation,
            "feature_dim": tr_f.shape[-1], "n_train": len(tr_y), "n_test": len(te_y), **extra,
            "wall_s": round(time.time() - start, 1)}


def run_attentive(args, subject, train_part, test_part, size, mean, std, device, normalisation, start) -> dict:
    from mimkit.eval.attentive import CAE_PROTOCOL, attentive_protocol_top1, load_attentive_recipe
    if subject.model is None or not hasattr(subject.model, "blocks"):
        raise ValueError("the attentive probe needs a ViT encoder (patch tokens); not raw pixels or a ResNet")
    flags = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.probe_batch}
    overrides = list(args.probe_overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None] + \
        [f"seed={args.seed}"]
    cfg = load_attentive_recipe(args.recipe, overrides)
    heads = subject.model.blocks[0].attn.num_heads
    top1 = attentive_protocol_top1(subject.model, train_part, test_part, size, mean, std, cfg, device, heads)
    return {"protocol": "attentive", "top1": round(top1, 2), "encoder": subject.description,
            "recipe": str(args.recipe or CAE_PROTOCOL), "epochs": cfg.epochs, "augment": cfg.augment,
            "batch": min(cfg.batch_size, len(train_part)), "heads": heads, "normalisation": normalisation,
            "n_train": len(train_part), "n_test": len(test_part), "wall_s": round(time.time() - start, 1)}


def run_finetune(args, subject, train_part, test_part, size, mean, std, device) -> dict:
    from mimkit.config import build_dataclass, load_yaml, parse_overrides, merge
    from mimkit.eval.finetune import FinetuneConfig, classifier_from_encoder, finetune
    from mimkit.eval.features import labels_of
    if subject.model is None or subject.timm_spec is None:
        raise SystemExit("mimkit: error: fine-tuning needs an encoder (--ckpt, or --config with --init/--random-init)")
    data = merge(load_yaml(args.recipe) if args.recipe else {}, parse_overrides(args.ft_overrides))
    cfg = build_dataclass(FinetuneConfig, data)
    num_classes = int(labels_of(train_part).max()) + 1
    name, kwargs = subject.timm_spec
    model = classifier_from_encoder(name, kwargs, subject.model.state_dict(), num_classes, cfg)
    result = finetune(model, train_part, test_part, size, mean, std, cfg, device)
    return {"protocol": "finetune", "top1": round(result["best_top1"], 2), "final_top1": round(result["final_top1"], 2),
            "encoder": subject.description, "recipe": args.recipe, "epochs": cfg.epochs, "n_train": len(train_part),
            "n_test": len(test_part), "wall_s": result["wall_s"]}


def dense_subject(args, channels: int):
    """The encoder `eval segment` / `eval detect` transfer, named as for the probes, and the mean and std their images
    are normalised with (None: the data's own)."""
    from mimkit.eval.encoders import probe_subject
    subject = probe_subject(args.ckpt, args.config, args.init, args.random_init, False, args.overrides,
                            in_chans=channels, seed=args.seed)
    if subject.timm_spec is None:
        raise ValueError(f"eval {args.protocol} needs an encoder: --ckpt RUN/last.pt or EXPORT, or --config with "
                         f"--init or --random-init")
    use_data = args.normalise == "data" or subject.mean is None
    return subject, (None, None) if use_data else (subject.mean, subject.std)


def run_segment(args) -> dict:
    """`eval segment`: the encoder fine-tuned with the recipe's head on seg:DIR."""
    from mimkit.data.segmentation import segmentation_split
    from mimkit.eval.segment import load_segment_recipe, segment_transfer
    train_set = segmentation_split(args.data, "train")
    subject, (mean, std) = dense_subject(args, train_set.channels)
    flags = {"head": args.head, "frozen": "true" if args.frozen else None, "steps": args.steps}
    cfg = load_segment_recipe(args.recipe, list(args.recipe_overrides) + [f"{k}={v}" for k, v in flags.items() if v])
    result = segment_transfer(subject.timm_spec, subject.model.state_dict(), subject.description, args.data, cfg,
                              args.out, mean, std, default_device(args.device), args.resume, args.val_limit,
                              log=lambda line: print(line, flush=True), train_set=train_set)
    return {**result, "recipe": args.recipe}


def run_detect(args) -> dict:
    """`eval detect`: the encoder fine-tuned inside a Mask R-CNN on coco:DIR."""
    from mimkit.data.detection import detection_split
    from mimkit.eval.detect import detect_transfer, load_detect_recipe
    train_set = detection_split(args.data, "train")
    subject, (mean, std) = dense_subject(args, train_set.channels)
    cfg = load_detect_recipe(args.recipe, list(args.recipe_overrides) + ([f"steps={args.steps}"] if args.steps else []))
    result = detect_transfer(subject.timm_spec, subject.model.state_dict(), subject.description, args.data, cfg,
                             args.out, mean, std, default_device(args.device), args.resume, args.val_limit,
                             log=lambda line: print(line, flush=True), train_set=train_set)
    return {**result, "recipe": args.recipe}


def run_recon(args) -> dict:

    from mimkit.data import build_dataset
    from mimkit.engine.checkpoint import load_checkpoint
    from mimkit.eval.recon import fid_feature_network, reconstruction_metrics
    from mimkit.export import method_from_checkpoint
    obj = load_checkpoint(args.ckpt)
    method, cfg = method_from_checkpoint(obj)
    device = default_device(args.device)
    fid_net = fid_feature_network(args.fid_encoder)
    stats = obj["data_stats"]
    return reconstruction_metrics(method, build_dataset(args.data, "test"), cfg.model.img_size, stats["mean"],
                                  stats["std"], args.num_images, mask_seed=args.mask_seed, device=device,
                                  inception_weights=args.inception_weights, fid_encoder=fid_net,
                                  fid_encoder_name=args.fid_encoder or "")


def run_robustness(args) -> dict:

    from mimkit.data import build_dataset
    from mimkit.eval import extract_features
    from mimkit.eval.encoders import probe_subject
    from mimkit.eval.features import labels_of, subset
    from mimkit.eval.linear import ProbedClassifier, linear_probe
    from mimkit.eval.robustness import corruption_accuracy, corruption_errors
    device = default_device(args.device)
    train_set, test_set = build_dataset(args.data, "train"), build_dataset(args.data, "test")
    train_part, test_part = subset(train_set, args.train_limit), subset(test_set, args.test_limit)
    severities = tuple(int(s) for s in args.severities.split(","))
    tables = {}
    for ckpt in [args.ckpt] + ([args.baseline] if args.baseline else []):
        subject = probe_subject(ckpt, in_chans=train_set.channels)
        mean, std = subject.mean or train_set.mean, subject.std or train_set.std
        feats, labels = extract_features(subject.model, train_part, subject.img_size, mean, std, subject.pool, device=device)
        head = linear_probe(feats, labels, int(labels_of(train_set).max()) + 1)
        tables[ckpt] = corruption_accuracy(ProbedClassifier(subject.model, head, subject.pool), test_part,
                                           subject.img_size, mean, std, severities=severities, device=device)
    table = tables[args.ckpt]
    return {"protocol": "robustness", "run": args.ckpt, "baseline": args.baseline or args.ckpt, "severities": severities,
            "accuracy": table, "ce": corruption_errors(table, tables[args.baseline or args.ckpt])}


def run_attention(args) -> dict:
    from pathlib import Path

    import torch

    from mimkit.data import EvalTransform, build_dataset, to_unit_float
    from mimkit.eval.attention import save_attention_grid
    from mimkit.eval.encoders import probe_subject
    dataset = build_dataset(args.data, "test")
    subject = probe_subject(args.ckpt, in_chans=dataset.channels)
    mean, std = subject.mean or dataset.mean, subject.std or dataset.std
    t = EvalTransform(subject.img_size)
    x = torch.stack([t(dataset[i][0]) for i in range(args.num_images)])
    x = to_unit_float(x)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    save_attention_grid(subject.model, (x - m) / s, x, tuple(subject.model.patch_embed.grid_size), Path(args.out),
                        title=f"{subject.description}: last-layer CLS attention")
    return {"attention_png": args.out, "encoder": subject.description, "heads": subject.model.blocks[-1].attn.num_heads}


def default_device(requested):
    from mimkit.engine.dist import default_device as choose
    return choose(requested)


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The parser's namespace, with `key=value` overrides accepted anywhere among a sub-command's options
    (`--config X a=1 --out Y b=2`): argparse takes the first run of them as the positional and leaves later
    ones over; those join the overrides in order, so a later one still wins."""
    parser = parser or build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        overrides = [item for item in rest if "=" in item and not item.startswith("-")]
        if len(overrides) < len(rest) or not isinstance(getattr(args, "overrides", None), list):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = args.overrides + overrides
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as done:     # --help (0) or a usage error, already said in one line (2)
        return done.code if isinstance(done.code, int) else 2
    from mimkit.config import ConfigError
    from mimkit.data import DataError
    from mimkit.engine.checkpoint import CheckpointError
    from mimkit.engine.trainer import TrainingDiverged
    from mimkit.methods.base import CheckpointMismatch

    # ValueError: a setting the model can't take (a mask size, a size name); MIMKIT_DEBUG=1 shows the traceback
    known = (ConfigError, DataError, CheckpointError, CheckpointMismatch, TrainingDiverged, FileExistsError, ValueError)
    try:
        return _run(args)
    except known as err:
        if os.environ.get("MIMKIT_DEBUG"):
            raise
        print(f"mimkit: error: {one_sentence(err)}", file=sys.stderr)
        return 2
    except OSError as err:   # a full or read-only disk, a path that is a file
        if os.environ.get("MIMKIT_DEBUG"):
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"mimkit: error: could not access{where} ({err.strerror or err}); check the path, its permissions "
              f"and free disk space", file=sys.stderr)
        return 2


def one_sentence(err: Exception) -> str:
    """The error's own sentence; for an error raised in a DataLoader worker, the original one, not the
    worker's traceback that PyTorch wraps around it."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _run(args) -> int:
    if args.command == "pretrain":
        cmd_pretrain(args)
    elif args.command == "eval" and args.protocol == "recon":
        print(json.dumps(run_recon(args)))
    elif args.command == "eval" and args.protocol == "robustness":
        print(json.dumps(run_robustness(args)))
    elif args.command == "eval" and args.protocol == "report":
        from mimkit.eval.report import run_report
        device = default_device(args.device)
        from pathlib import Path
        first = Path(args.runs[0].removeprefix("random:"))
        out = args.out or (first if first.is_dir() else first.parent) / "report"
        run_report(args.runs, out, args.data, tuple(args.protocols.split(",")), args.train_limit,
                   args.test_limit, tuple(int(s) for s in args.severities.split(",")), device=device,
                   inception_weights=args.inception_weights, fid_encoder=args.fid_encoder,
                   finetune_recipe=args.finetune_recipe, finetune_epochs=args.finetune_epochs,
                   segment_data=args.segment_data, segment_recipe=args.segment_recipe, segment_steps=args.segment_steps,
                   detect_data=args.detect_data, detect_recipe=args.detect_recipe, detect_steps=args.detect_steps)
    elif args.command == "eval" and args.protocol == "segment":
        print(json.dumps(run_segment(args)))
    elif args.command == "eval" and args.protocol == "detect":
        print(json.dumps(run_detect(args)))
    elif args.command == "eval":
        print(json.dumps(run_probe(args, args.protocol)))
    elif args.command == "visualize" and args.what == "reconstruction":
        from pathlib import Path

        from mimkit.data import build_dataset
        from mimkit.eval.report import load_entry, save_reconstructions
        entry = load_entry(args.ckpt)
        save_reconstructions(entry, build_dataset(args.data, "test"), Path(args.out), args.num_images, args.seed)
        print(json.dumps({"reconstruction_png": args.out, "run": entry.label}))
    elif args.command == "visualize":
        print(json.dumps(run_attention(args)))
    elif args.command == "export":
        from mimkit.export import export_encoder
        weights, meta = export_encoder(args.ckpt, args.out)
        print(json.dumps({"safetensors": str(weights), "json": str(meta)}))
    elif args.command == "tokenizer":
        run_tokenizer_command(args)
    elif args.command == "data" and args.data_command in ("make-segmentation", "make-detection"):
        from mimkit.data.detection import make_detection
        from mimkit.data.segmentation import make_segmentation
        make = make_segmentation if args.data_command == "make-segmentation" else make_detection
        start = time.time()
        made = make(args.out, args.data, args.canvas, args.train_count, args.val_count, seed=args.seed)
        print(json.dumps({"out": args.out, **made, "wall_s": round(time.time() - start, 1)}))
    elif args.command == "data":
        from mimkit.data.shards import pack_shards
        size = args.shard_size.strip().upper()
        units = {"KB": 2 ** 10, "MB": 2 ** 20, "GB": 2 ** 30, "B": 1}
        unit = next((u for u in units if size.endswith(u)), "B")
        try:
            shard_bytes = int(float(size[: len(size) - len(unit)]) * units[unit])
        except ValueError:
            raise ValueError(f"--shard-size must be a size like 512MB or 1GB, not {args.shard_size!r}") from None
        if shard_bytes < 2 ** 10:
            raise ValueError(f"--shard-size={args.shard_size} is too small; use at least 1KB (1GB is typical)")
        index = pack_shards(args.data, args.out, shard_bytes, args.channels)
        print(json.dumps({"out": args.out, "images": index["count"], "shards": len(index["shards"])}))
    elif args.command == "bench":
        from mimkit.config import load_config
        from mimkit.engine.cost import format_table, measure
        modes = () if args.modes == "none" else tuple(m.strip() for m in args.modes.split(","))
        if not set(modes) <= {"eager", "compiled", "checkpointed"} or args.steps < 1 or args.warmup < 0:
            raise ValueError(f"--modes must list eager, compiled or checkpointed (got {args.modes!r}), --steps at least 1 "
                             f"and --warmup 0 or more")
        for config in args.config:
            cfg = load_config(config, list(args.overrides))
            batch = args.batch or cfg.data.batch_size
            print(format_table(config, batch, measure(cfg, batch, args.steps, args.warmup, modes, args.device,
                                                      world=args.world)),
                  end="\n\n", flush=True)
    elif args.command == "demo":
        from mimkit.demo import run_demo
        run_demo(args.out, args.config, args.steps, args.train_limit, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
