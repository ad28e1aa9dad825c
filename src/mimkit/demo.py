"""The README's demo: pre-train a tiny MAE on Fashion-MNIST, probe it against random init and raw pixels,
and write RUN/report.md with the numbers, the settings and the reconstruction grid."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "mae_vit-mini_fmnist-tiny.yaml"
DEFAULT_STEPS = 500


def run_demo(out: str | Path = "runs/demo", config: str | None = None, steps: int | None = None,
             train_limit: int | None = 20000, device: str | None = None) -> dict:
    from mimkit.config import load_config
    from mimkit.data import build_dataset
    from mimkit.engine.trainer import Trainer
    from mimkit.eval import extract_features, knn_top1, linear_probe_top1
    from mimkit.eval.features import subset
    from mimkit.methods import build_method

    out = Path(out)
    recipe = Path(config) if config else DEFAULT_RECIPE
    cfg = load_config(recipe, [f"train.steps={steps or DEFAULT_STEPS}"])
    print(f"[demo] pre-training {cfg.method['name']} ({recipe.name}) for {cfg.train.steps} steps into {out}", flush=True)
    start = time.time()
    trainer = Trainer(cfg, out, resume=True, device=device)  # re-running the demo continues, never overwrites
    trainer.train()
    pretrain_s = time.time() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]

    train_set, test_set = build_dataset(cfg.data.spec, "train"), build_dataset(cfg.data.spec, "test")
    train_part = subset(train_set, train_limit)
    mean, std = trainer.mean.flatten().tolist(), trainer.std.flatten().tolist()
    dev = trainer.device
    torch.manual_seed(cfg.train.seed)
    random_encoder = build_method(cfg, trainer.in_chans).encoder.model
    subjects = {"pre-trained (this run)": trainer.method.encoder.model, "random init": random_encoder,
                "raw pixels": None}
    results = {}
    for name, model in subjects.items():
        t0 = time.time()
        print(f"[demo] probing {name}", flush=True)
        tr = extract_features(model, train_part, cfg.model.img_size, mean, std, cfg.model.pool, device=dev)
        te = extract_features(model, test_set, cfg.model.img_size, mean, std, cfg.model.pool, device=dev)
        results[name] = {"knn_top1": round(knn_top1(*tr, *te, k=20), 2),
                         "linear_top1": round(linear_probe_top1(*tr, *te), 2),
                         "feature_dim": tr[0].shape[1], "wall_s": round(time.time() - t0, 1)}
        print(f"[demo]   {name}: {results[name]}", flush=True)
    summary = {"run": str(out), "steps": trainer.total_steps, "pretrain_wall_s": round(pretrain_s, 1),
               "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
               "img_per_s": round(sum(r["img_per_s"] for r in rows[1:]) / max(len(rows) - 1, 1), 1),
               "n_probe_train": len(train_part), "n_probe_test": len(test_set), "results": results}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    write_report(out, cfg, summary, rows)
    print(f"[demo] wrote {out / 'report.md'}", flush=True)
    return summary


def write_report(out: Path, cfg, summary: dict, rows: list[dict]) -> None:
    lines = [f"# mimkit demo: {cfg.method['name'].upper()} on Fashion-MNIST", "",
             f"Pre-trained {summary['steps']} steps (batch {cfg.data.batch_size}) in {summary['pretrain_wall_s']} s, "
             f"~{summary['img_per_s']} images/s; loss {summary['first_loss']:.4f} (first log) -> "
             f"{summary['last_loss']:.4f} (last log).", "",
             f"Probes on frozen features ({cfg.model.pool} pooling): k-NN (k=20, weighted vote) and linear probe "
             f"(BatchNorm without affine + linear, SGD 30 epochs), trained on {summary['n_probe_train']} train "
             f"images, measured on the {summary['n_probe_test']} test images.", "",
             "| encoder | k-NN top-1 (%) | linear top-1 (%) | feature dim |", "|---|---|---|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | {r['feature_dim']} |")
    step = max(1, len(rows) // 8)
    lines += ["", "## Loss", "", "| step | loss | lr | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.2e} | {r['img_per_s']:.0f} |" for r in rows[::step]]
    lines += ["", "## Reconstructions (original | masked | reconstruction)", "", "![samples](samples/final.png)", "",
              "## Settings", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""]
    (out / "report.md").write_text("\n".join(lines))
