"""Every method in mimkit on Fashion-MNIST at equal epochs and at equal training FLOPs, in the papers' table layout.

    python benchmarks/fmnist_table.py --epochs 3 --train-images 6000 [--transfer sklearn-digits | idx:DIR | folder:DIR]
                                      [--methods mae,simmim,...] [--out runs/fmnist-table] [--device cuda]

Pre-training: each method's `*_vit-mini_fmnist-tiny.yaml` recipe (ViT-mini, patch 4, 28 px), at `--batch`, on the
first `--train-images` of a seeded shuffle of the Fashion-MNIST train set (all 60,000 when 0), for `--epochs` epochs
of those images ("equal epochs"); then again for the training FLOPs that MAE spends in those epochs ("equal FLOPs",
FLOPs per image counted with torch.utils.flop_counter over one whole step, `engine.cost.flops_per_image`; a method
costlier than MAE gets fewer steps). Evaluation (`eval report`'s protocols, frozen encoder unless fine-tuned): k-NN
(k=20), linear probe, attentive probe, end-to-end fine-tuning (configs/finetune/fmnist-tiny.yaml: layer decay,
light mixup and RandAugment) for `--finetune-epochs`, each trained on
`--train-limit` train images and measured on `--test-limit` test images (fine-tuning for the equal-epochs rows
only: it costs more than all the probes together), and reconstruction metrics (L1, PSNR, SSIM;
FID with `--fid-encoder`) on 500 test images with seeded masks. Reference rows: the same architecture at random init
and raw pixels. Transfer: k-NN and linear probe of the frozen encoders on a second data set, by default scikit-learn's
8x8 handwritten digits (1,797 images, enlarged to 28 px; split 1,297 train / 500 test; needs `pip install
scikit-learn`), normalised with the pre-training statistics. Dense transfer (the mIoU column, equal-epochs rows and
random init): `eval segment` with configs/segment/upernet_vit-mini_fmnist-canvas.yaml for `--segment-steps` (200,
about 6 minutes per method on 2 CPU cores; 0 leaves the column out) on `mimkit data make-segmentation`'s default
benchmark (2,000 train / 500 val 64x64 canvases, seed 0), written to OUT/canvases; the AP columns: `eval detect`
with configs/detect/maskrcnn_vit-mini_fmnist-canvas.yaml for `--detect-steps` (400, about 9 minutes per method; 0
leaves them out) on `mimkit data make-detection`'s default benchmark (the same canvases as COCO JSON), in
OUT/coco-canvases.

CAE's targets come from the tiny dVAE tokenizer its recipe names (`runs/dvae-fmnist-tiny/last.pt`, relative to the
working directory); when it is missing it is trained first (2 epochs, ~24 min on one CPU core).
Everything lands in OUT: runs (resumable), per-row results (`results/*.json`, re-used on a re-run), and `table.md`
(rewritten after every row; `--table-only` writes it from the results kept so far, rows not run yet "pending").
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from mimkit.config import load_config
from mimkit.data.datasets import read_idx, resolve_spec, write_idx
from mimkit.demo import steps_done
from mimkit.engine.cost import flops_per_image

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {   # the method's name in the table -> its tiny recipe
    "MAE": "mae_vit-mini_fmnist-tiny",
    "SimMIM": "simmim_vit-mini_fmnist-tiny",
    "Vision ELECTRA": "vision-electra_vit-mini_fmnist-tiny",
    "GAN-MAE": "gan-mae_vit-mini_fmnist-tiny",
    "CAE": "cae_vit-mini_fmnist-tiny",
    "CIM (ResPix, ViT)": "cim-respix_vit-mini_fmnist-tiny",
    "Perceptual MAE (LS-GAN-P)": "perceptual-mae-lsgan-p_vit-mini_fmnist-tiny",
}
FINETUNED = {"equal epochs": ("finetune",), "equal FLOPs": ()}   # fine-tuning costs most: once per method
KEYS = {"mae": "MAE", "simmim": "SimMIM", "vision-electra": "Vision ELECTRA", "gan-mae": "GAN-MAE", "cae": "CAE",
        "cim": "CIM (ResPix, ViT)", "perceptual-mae": "Perceptual MAE (LS-GAN-P)"}


def subset_idx(out: Path, count: int, seed: int = 0) -> str:
    """The first `count` images of a seeded shuffle of the Fashion-MNIST train set (and the whole test set) as IDX."""
    if not count:
        return "fashion-mnist"
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_spec("fashion-mnist")[1]
    if not (out / "train-images-idx3-ubyte.gz").exists():
        images, labels = (read_idx(source / f"train-{k}-idx{d}-ubyte.gz") for k, d in (("images", 3), ("labels", 1)))
        pick = np.sort(np.random.default_rng(seed).permutation(len(images))[:count])
        write_idx(out / "train-labels-idx1-ubyte.gz", labels[pick])
        write_idx(out / "train-images-idx3-ubyte.gz", images[pick])
        for kind, dims in (("images", 3), ("labels", 1)):
            name = f"t10k-{kind}-idx{dims}-ubyte.gz"
            write_idx(out / name, read_idx(source / name))
    return f"idx:{out}"


def digits_idx(out: Path) -> str:
    """scikit-learn's 8x8 digits (0..16 grey levels) enlarged to 28 x 28 like MNIST (20 px digit, 4 px border)."""
    if not (out / "t10k-labels-idx1-ubyte.gz").exists():
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = torch.from_numpy(digits.images).float()[:, None] / 16.0
        x = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
        x = torch.nn.functional.pad(x, (4, 4, 4, 4))
        images = (x[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        order = np.random.default_rng(0).permutation(len(images))
        out.mkdir(parents=True, exist_ok=True)
        for prefix, part in (("train", order[:-500]), ("t10k", order[-500:])):
            write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[part])
            write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", digits.target[part])
    return f"idx:{out}"


def ensure_tokenizer(recipe: str, device: str | None) -> None:
    """Trains the tiny dVAE a recipe's targets come from (CAE, CIM) when it is missing: before the plan, whose FLOP
    count builds the method (2 epochs, ~24 CPU min)."""
    from mimkit.engine.trainer import Trainer
    from mimkit.config import load_yaml
    path = (load_yaml(CONFIGS / f"{recipe}.yaml").get("tokenizer") or {}).get("path")
    if path and not Path(path).exists():
        print(f"[table] training the tokenizer {path} first (configs/tokenizer/dvae_fmnist-tiny.yaml)", flush=True)
        Trainer(load_config(CONFIGS / "tokenizer" / "dvae_fmnist-tiny.yaml"), Path(path).parent, resume=True,
                device=device).train()


def pretrain(recipe: str, out: Path, steps: int, overrides: list[str], device: str | None) -> Path:
    from mimkit.engine.trainer import Trainer
    cfg = load_config(CONFIGS / f"{recipe}.yaml", overrides + [f"train.steps={steps}"])
    if steps_done(out) < steps:
        Trainer(cfg, out, resume=True, device=device).train()
    return out


def evaluate(spec: str, out: Path, data: str, protocols, args) -> dict:
    """One row of `eval report` (kept in OUT/results, so a re-run skips it)."""
    from mimkit.eval.report import run_report
    if out.with_suffix(".json").exists():
        return json.loads(out.with_suffix(".json").read_text())
    row = run_report([spec], out, data=data, protocols=protocols, train_limit=args.train_limit,
                     test_limit=args.test_limit, finetune_epochs=args.finetune_epochs,
                     finetune_recipe=str(CONFIGS / "finetune" / "fmnist-tiny.yaml"), device=args.device or "cpu",
                     fid_encoder=args.fid_encoder, log=lambda m: print(m, flush=True))[0]
    out.with_suffix(".json").write_text(json.dumps(row, indent=2, default=float))
    return row


def dense(protocol: str, spec: str, out: Path, folder: Path, args) -> dict:
    """The mIoU or AP cells: `eval report`'s segment or detect protocol (kept in OUT/results, so a re-run skips it);
    the canvas benchmark is made in `folder` the first time."""
    from mimkit.data.detection import make_detection
    from mimkit.data.segmentation import make_segmentation
    from mimkit.eval.report import run_report
    if out.with_suffix(".json").exists():
        return json.loads(out.with_suffix(".json").read_text())
    if protocol == "segment":
        if not (folder / "classes.json").exists():
            make_segmentation(folder)
        data = {"segment_data": f"seg:{folder}", "segment_steps": args.segment_steps}
    else:
        if not (folder / "annotations").exists():
            make_detection(folder)
        data = {"detect_data": f"coco:{folder}", "detect_steps": args.detect_steps}
    row = run_report([spec], out, protocols=(protocol,), train_limit=args.train_limit, test_limit=args.test_limit,
                     device=args.device or "cpu", log=lambda m: print(m, flush=True), **data)[0][protocol]
    out.with_suffix(".json").write_text(json.dumps(row, indent=2, default=float))
    return row


def raw_pixels(data: str, args, mean, std) -> dict:
    from mimkit.data import build_dataset
    from mimkit.eval import extract_features, knn_top1, linear_probe_top1
    from mimkit.eval.features import subset
    tr = extract_features(None, subset(build_dataset(data, "train"), args.train_limit), (28, 28), mean, std)
    te = extract_features(None, subset(build_dataset(data, "test"), args.test_limit), (28, 28), mean, std)
    return {"knn": knn_top1(*tr, *te, k=20), "linear": linear_probe_top1(*tr, *te)}


def cell(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], args, transfer_name: str | None) -> str:
    images = args.train_images or 60000
    head = ["method", "budget", "steps", "epochs", "GFLOP/img", "TFLOP total", "k-NN", "linear", "attentive",
            "fine-tune", "L1", "PSNR", "SSIM"] + (["FID"] if args.fid_encoder else []) + \
        (["mIoU"] if args.segment_steps else []) + (["AP box", "AP mask"] if args.detect_steps else []) + \
        ([f"{transfer_name} k-NN", f"{transfer_name} linear"] if transfer_name else [])
    lines = [f"Fashion-MNIST, ViT-mini (patch 4, 28 px) tiny recipes, batch {args.batch}, pre-trained on "
             f"{images:,} train images for {args.epochs:g} epochs (equal epochs) or MAE's training FLOPs of those "
             f"epochs (equal FLOPs). Probes trained on {args.train_limit:,} train images, measured on "
             f"{args.test_limit:,} test images (top-1 %); fine-tuning (best top-1) for {args.finetune_epochs} "
             "epochs with configs/finetune/fmnist-tiny.yaml; "
             + (f"mIoU (%) of UperNet fine-tuned {args.segment_steps} steps on the 64x64 canvas benchmark "
                "(configs/segment/upernet_vit-mini_fmnist-canvas.yaml); " if args.segment_steps else "") +
             (f"COCO AP (%) of boxes and masks of Mask R-CNN fine-tuned {args.detect_steps} steps on the canvas "
              "benchmark (configs/detect/maskrcnn_vit-mini_fmnist-canvas.yaml); " if args.detect_steps else "") +
             "reconstruction metrics on 500 test images with seeded masks.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        if r.get("pending"):
            lines.append(f"| {r['method']} | {r['budget']} | {r.get('steps', '')} | {cell(r.get('epochs'), 2)} | "
                         f"{cell(r.get('gflops'), 3)} | {cell(r.get('tflops'), 2)} | pending |" + " |" * (len(head) - 7))
            continue
        m, t, recon = r.get("main", {}), r.get("transfer", {}), r.get("main", {}).get("recon") or {}
        ft = (m.get("finetune") or {}).get("best_top1")
        cells = [r["method"], r["budget"], str(r.get("steps", "")), cell(r.get("epochs"), 2),
                 cell(r.get("gflops"), 3), cell(r.get("tflops"), 2), cell(m.get("knn")), cell(m.get("linear")),
                 cell(m.get("attentive")), cell(ft), cell(recon.get("l1"), 4), cell(recon.get("psnr"), 2),
                 cell(recon.get("ssim"), 3)] + ([cell(recon.get("fid"), 2)] if args.fid_encoder else []) + \
            ([cell((r.get("segment") or {}).get("miou"))] if args.segment_steps else []) + \
            ([cell((r.get("detect") or {}).get(k)) for k in ("box_ap", "mask_ap")] if args.detect_steps else []) + \
            ([cell(t.get("knn")), cell(t.get("linear"))] if transfer_name else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--train-images", type=int, default=6000, help="pre-training images (0: all 60,000)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default=",".join(KEYS), help=f"comma-separated, from {', '.join(KEYS)}")
    parser.add_argument("--transfer", default="sklearn-digits", help="sklearn-digits | idx:DIR | folder:DIR | none")
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--finetune-epochs", type=int, default=5, help="configs/finetune/fmnist-tiny.yaml's 5")
    parser.add_argument("--segment-steps", type=int, default=200, help="eval segment iterations (0: no mIoU column)")
    parser.add_argument("--detect-steps", type=int, default=400, help="eval detect iterations (0: no AP columns)")
    parser.add_argument("--fid-encoder", default=None, help="a FID feature encoder (see `mimkit eval report`)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="runs/fmnist-table")
    parser.add_argument("--table-only", action="store_true",
                        help="write OUT/table.md from the results kept so far; rows not run yet say 'pending'")
    args = parser.parse_args()
    out = Path(args.out)
    names = [KEYS[k.strip()] for k in args.methods.split(",")]
    if "MAE" not in names:
        names.insert(0, "MAE")          # the equal-FLOPs budget is MAE's
    data = subset_idx(out / "data", args.train_images)
    transfer = None if args.transfer == "none" else digits_idx(out / "digits") if args.transfer == "sklearn-digits" \
        else args.transfer
    transfer_name = "digits" if args.transfer == "sklearn-digits" else (None if transfer is None else "transfer")
    overrides = [f"data.spec={data}", f"data.batch_size={args.batch}", "train.sample_every=0", "train.log_every=20"]
    epoch_steps = math.ceil(args.epochs * (args.train_images or 60000) / args.batch)
    for n in names:
        ensure_tokenizer(RECIPES[n], args.device)
    flops = {n: flops_per_image(load_config(CONFIGS / f"{RECIPES[n]}.yaml", overrides), 1) for n in names}
    plan = [(n, "equal epochs", epoch_steps) for n in names]
    plan += [(n, "equal FLOPs", max(1, round(epoch_steps * flops["MAE"] / flops[n]))) for n in names if n != "MAE"]
    print("plan:", ", ".join(f"{n} {b} {s} steps" for n, b, s in plan), flush=True)
    rows = []
    start = time.time()

    def write(final: bool) -> None:         # after every row, so an interrupted run leaves what it finished
        text = table(rows, args, transfer_name)
        (out / "table.md").write_text(text)
        (out / "table.json").write_text(json.dumps(rows, indent=2, default=float))
        if final:
            print(text + f"\nwrote {out / 'table.md'} ({time.time() - start:.0f} s)", flush=True)

    first = out / "runs" / f"{RECIPES['MAE']}-{epoch_steps}"
    for n, budget, steps in plan:
        run, key = out / "runs" / f"{RECIPES[n]}-{steps}", f"{RECIPES[n]}-{steps}"
        row = {"method": n, "budget": budget, "steps": steps, "epochs": steps * args.batch / (args.train_images or 60000),
               "gflops": flops[n] / 1e9, "tflops": flops[n] * steps * args.batch / 1e12}
        if args.table_only and not (out / "results" / f"{key}.json").exists():
            rows.append({**row, "pending": True})
            continue
        print(f"[table] {n}, {budget}: {steps} steps ({time.time() - start:.0f} s so far)", flush=True)
        pretrain(RECIPES[n], run, steps, overrides, args.device)
        row["main"] = evaluate(str(run), out / "results" / key, "fashion-mnist",
                               ("knn", "linear", "attentive", "recon") + FINETUNED[budget], args)
        if transfer:
            row["transfer"] = evaluate(str(run), out / "results" / f"{key}-transfer", transfer, ("knn", "linear"), args)
        if args.segment_steps and budget == "equal epochs":
            row["segment"] = dense("segment", str(run), out / "results" / f"{key}-segment", out / "canvases", args)
        if args.detect_steps and budget == "equal epochs":
            row["detect"] = dense("detect", str(run), out / "results" / f"{key}-detect", out / "coco-canvases", args)
        rows.append(row)
        write(final=False)
    reference = {"method": "random init (same ViT-mini)", "budget": "none"}
    if args.table_only and not (out / "results" / "random-init.json").exists():
        reference["pending"] = True
    else:
        reference["main"] = evaluate(f"random:{first}", out / "results" / "random-init", "fashion-mnist",
                                     ("knn", "linear", "attentive", "finetune"), args)
        if transfer:
            reference["transfer"] = evaluate(f"random:{first}", out / "results" / "random-init-transfer", transfer,
                                             ("knn", "linear"), args)
        if args.segment_steps:
            reference["segment"] = dense("segment", f"random:{first}", out / "results" / "random-init-segment",
                                         out / "canvases", args)
        if args.detect_steps:
            reference["detect"] = dense("detect", f"random:{first}", out / "results" / "random-init-detect",
                                        out / "coco-canvases", args)
    stats = torch.load(first / "last.pt", weights_only=True, mmap=True)["data_stats"]
    pixels = {"method": "raw pixels", "budget": "none", "main": raw_pixels("fashion-mnist", args, stats["mean"], stats["std"])}
    if transfer:
        pixels["transfer"] = raw_pixels(transfer, args, stats["mean"], stats["std"])
    rows += [reference, pixels]
    write(final=True)


if __name__ == "__main__":
    main()
