"""The README's demo on Fashion-MNIST, on whatever device there is (a 2-core CPU: ~10 minutes).

Pre-trains Vision ELECTRA (tiny), then MAE for the same number of steps and for the same wall-clock
time, probes every encoder (k-NN and linear) next to a random-init encoder and raw pixels, and writes
RUN/report.md with the numbers, the settings and the reconstruction grids. With `--config` naming an
MAE or SimMIM recipe it pre-trains and probes that one method alone.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VE_RECIPE = CONFIGS / "vision-electra_vit-mini_fmnist-tiny.yaml"
MAE_RECIPE = CONFIGS / "mae_vit-mini_fmnist-tiny.yaml"
DEMO_OVERRIDES = ["data.batch_size=64", "train.sample_every=100", "train.log_every=10"]
DEFAULT_STEPS = 200


def pretrain(recipe: Path, out: Path, steps: int, device: str | None) -> dict:
    from mimkit.config import load_config
    from mimkit.engine.trainer import Trainer
    cfg = load_config(recipe, DEMO_OVERRIDES + [f"train.steps={steps}"])
    print(f"[demo] pre-training {cfg.method['name']} ({recipe.name}) for {steps} steps into {out}", flush=True)
    trainer = Trainer(cfg, out, resume=True, device=device)  # re-running the demo continues, never overwrites
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    wall, previous = 0.0, 0   # pre-training time summed over log intervals (also across resumed sessions)
    for r in rows:
        wall += (r["step"] - previous) * cfg.data.batch_size / max(r["img_per_s"], 1e-9)
        previous = r["step"]
    return {"name": cfg.method["name"], "cfg": cfg, "trainer": trainer, "rows": rows, "steps": steps,
            "wall_s": round(wall, 1), "out": out}


def run_demo(out: str | Path = "runs/demo", config: str | None = None, steps: int | None = None,
             train_limit: int | None = 10000, device: str | None = None) -> dict:
    out = Path(out)
    steps = steps or DEFAULT_STEPS
    runs = []
    main = pretrain(Path(config) if config else VE_RECIPE, out / "main", steps, device)
    runs.append(("main", main))
    if main["name"] != "mae":
        same_steps = pretrain(MAE_RECIPE, out / "mae-equal-steps", steps, device)
        equal_time_steps = max(1, round(steps * main["wall_s"] / max(same_steps["wall_s"], 1e-6)))
        same_time = pretrain(MAE_RECIPE, out / "mae-equal-time", equal_time_steps, device)
        runs += [("mae-equal-steps", same_steps), ("mae-equal-time", same_time)]
    results = probe_all(runs, train_limit, device)
    summary = {"runs": {key: {k: v for k, v in r.items() if k in ("name", "steps", "wall_s")} for key, r in runs},
               "results": results, "n_probe_train": train_limit}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    write_report(out, runs, results, train_limit)
    print(f"[demo] wrote {out / 'report.md'}", flush=True)
    return summary


def probe_all(runs, train_limit, device) -> dict:
    from mimkit.data import build_dataset
    from mimkit.eval import extract_features, knn_top1, linear_probe_top1
    from mimkit.eval.features import subset
    from mimkit.methods import build_method

    main = runs[0][1]
    cfg, trainer = main["cfg"], main["trainer"]
    train_set, test_set = build_dataset(cfg.data.spec, "train"), build_dataset(cfg.data.spec, "test")
    train_part = subset(train_set, train_limit)
    mean, std = trainer.mean.flatten().tolist(), trainer.std.flatten().tolist()
    torch.manual_seed(cfg.train.seed)
    subjects = {label(key, r): r["trainer"].method.encoder.model for key, r in runs}
    subjects["random init (same architecture)"] = build_method(cfg, trainer.in_chans).encoder.model
    subjects["raw pixels"] = None
    results = {}
    for name, model in subjects.items():
        start = time.time()
        tr = extract_features(model, train_part, cfg.model.img_size, mean, std, cfg.model.pool, device=trainer.device)
        te = extract_features(model, test_set, cfg.model.img_size, mean, std, cfg.model.pool, device=trainer.device)
        results[name] = {"knn_top1": round(knn_top1(*tr, *te, k=20), 2),
                         "linear_top1": round(linear_probe_top1(*tr, *te), 2), "feature_dim": tr[0].shape[1],
                         "probe_s": round(time.time() - start, 1)}
        print(f"[demo] {name}: {results[name]}", flush=True)
    return results


def label(key: str, run: dict) -> str:
    what = {"vision_electra": "Vision ELECTRA discriminator", "mae": "MAE encoder", "simmim": "SimMIM encoder"}
    suffix = {"main": "", "mae-equal-steps": " (equal steps)", "mae-equal-time": " (equal wall-clock)"}[key]
    return f"{what.get(run['name'], run['name'])}{suffix}, {run['steps']} steps, {run['wall_s']:.0f} s"


def write_report(out: Path, runs, results: dict, train_limit) -> None:
    main = runs[0][1]
    cfg = main["cfg"]
    lines = [f"# mimkit demo: {main['name']} on Fashion-MNIST", "",
             "Each encoder is frozen; probes use its " + cfg.model.pool + "-pooled features: k-NN (k=20, "
             "weighted vote) and a linear probe (BatchNorm without affine + linear layer, SGD, 30 epochs), trained "
             f"on {train_limit or 'all'} train images and measured on the 10,000 test images. Wall-clock is "
             "pre-training time on this machine.", "",
             "| encoder | k-NN top-1 (%) | linear top-1 (%) | feature dim |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | {r['feature_dim']} |"
              for name, r in results.items()]
    for key, run in runs:
        rows = run["rows"]
        parts = [k for k in rows[-1] if k.startswith(("loss", "acc_"))]
        lines += ["", f"## {label(key, run)}", "", f"Run directory `{run['out']}`; batch {run['cfg'].data.batch_size}, "
                  f"~{sum(r['img_per_s'] for r in rows) / len(rows):.0f} images/s.", "",
                  "| step | " + " | ".join(parts) + " |", "|---" * (len(parts) + 1) + "|"]
        picked = rows[:: max(1, len(rows) // 6)]
        picked += [rows[-1]] if picked[-1] is not rows[-1] else []
        for r in picked:
            lines.append(f"| {r['step']} | " + " | ".join(f"{r[p]:.4f}" for p in parts) + " |")
        grid = run["out"] / "samples" / "final.png"
        rows_text = "original | masked | reconstruction" + (" | second noise draw" if run["name"] == "vision_electra" else "")
        lines += ["", f"Reconstructions ({rows_text}):", "", f"![{key}]({grid.relative_to(out)})"]
    lines += ["", "## Settings of the main run", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
              "```", ""]
    (out / "report.md").write_text("\n".join(lines))
