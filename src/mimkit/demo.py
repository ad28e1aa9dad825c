"""The README's demo on Fashion-MNIST: a plan in steps and FLOPs, never in measured wall time, so load on the machine
makes it slower but never changes what it runs.

Stages: (1) Vision ELECTRA (tiny), `steps` steps; (2) MAE for the same steps; (3) MAE for the same training FLOPs as
stage 1 (counted with torch.utils.flop_counter, `engine.cost.flops_per_image`); (4) k-NN and linear probes of every
encoder beside the same architecture at random init and raw pixels; (5) the report. The plan, with a time estimate at
the speed measured on this machine, is printed first; each stage prints its own ETA; RUN/report.md is rewritten
after every stage, so an interrupted demo leaves what it finished, and re-running continues where it stopped (runs
resume from their checkpoints, probe results are kept in RUN/probes.json). With `--config` naming one recipe it
pre-trains and probes that method alone.
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
DEFAULT_STEPS = 100
NAMES = {"vision_electra": "Vision ELECTRA", "mae": "MAE", "simmim": "SimMIM"}
RAW_PIXELS_NOTE = (
    "Raw pixels are a strong baseline here, and the demo does not claim to beat them: Fashion-MNIST images are 28 x 28, "
    "grey, centred and aligned, so the 784 pixel values already place most garments of one class near each other "
    "(k-NN on pixels: ~81-85 %). A ViT pre-trained for a few hundred steps has seen a fraction of one epoch; what the "
    "demo shows is that pre-training moves the same architecture well above its random initialisation within minutes. "
    "Passing raw pixels takes pre-training for many epochs; on natural images at 224 px, where pixels are not "
    "aligned, the pixel baseline is far weaker.")


class Stage:
    def __init__(self, key: str, title: str, recipe: Path | None = None, steps: int = 0):
        self.key, self.title, self.recipe, self.steps = key, title, recipe, steps


def plan(config: str | None, steps: int, overrides=()) -> list[Stage]:
    """The stages, sized in steps; the equal-FLOPs MAE run from counted FLOPs per image of each recipe."""
    from mimkit.config import load_config
    from mimkit.engine.cost import flops_per_image
    main = Path(config) if config else VE_RECIPE
    name = load_config(main, list(overrides)).method["name"]
    stages = [Stage("main", f"{NAMES.get(name, name)}, {steps} steps", main, steps)]
    if name == "vision_electra":
        ve = flops_per_image(load_config(main, DEMO_OVERRIDES + list(overrides)), 1)
        mae = flops_per_image(load_config(MAE_RECIPE, DEMO_OVERRIDES + list(overrides)), 1)
        equal = max(1, round(steps * ve / mae))
        stages += [Stage("mae-equal-steps", f"MAE, {steps} steps (equal steps)", MAE_RECIPE, steps),
                   Stage("mae-equal-flops", f"MAE, {equal} steps (equal training FLOPs: {ve / 1e9:.2f} vs "
                         f"{mae / 1e9:.2f} GFLOP per image and step)", MAE_RECIPE, equal)]
    return stages + [Stage("probes", "probes: k-NN and linear on frozen features"), Stage("report", "report")]


def seconds_per_step(recipe: Path, device: str | None, overrides=(), steps: int = 4) -> float:
    """Measured here, now: a short engine run of the recipe at the demo's batch, the median of its steps after the
    first (which pays for start-up); for the up-front estimate only."""
    import statistics
    import tempfile

    from mimkit.config import load_config
    from mimkit.engine.logging import read_metrics
    from mimkit.engine.trainer import Trainer
    cfg = load_config(recipe, DEMO_OVERRIDES + list(overrides) + [f"train.steps={steps}", "train.sample_every=0",
                                                                  "train.log_every=1"])
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(cfg, tmp, quiet=True, device=device).train()
        return statistics.median(r["step_s"] for r in read_metrics(Path(tmp))[1:] if "step_s" in r)


def steps_done(run: Path) -> int:
    """The step of RUN/last.pt (0 when there is none): what a re-run of the demo does not train again."""
    path = run / "last.pt"
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]) if path.exists() else 0


def run_demo(out: str | Path = "runs/demo", config: str | None = None, steps: int | None = None,
             train_limit: int | None = 5000, device: str | None = None, overrides=()) -> dict:
    """`overrides`: config overrides for every run (e.g. another data spec or model size)."""
    out = Path(out)
    steps = steps or DEFAULT_STEPS
    stages = plan(config, steps, overrides)
    left = {s.key: s.steps - steps_done(out / s.key) for s in stages if s.recipe}      # a re-run continues
    speeds = {recipe: seconds_per_step(recipe, device, overrides)
              for recipe in {s.recipe for s in stages if s.recipe and left[s.key] > 0}}
    cache = out / "probes.json"
    probes_left = len(stages) - 1 - (len(json.loads(cache.read_text())) if cache.exists() else 0)
    probe_s = 60.0 * max(probes_left, 0) * (train_limit or 60000) / 10000   # about a minute per encoder per 10k
    estimates = [left[s.key] * speeds.get(s.recipe, 0.0) if s.recipe else (probe_s if s.key == "probes" else 1.0)
                 for s in stages]
    print(f"[demo] plan ({sum(estimates) / 60:.0f} min at the speed measured now; more if the machine gets busier):",
          flush=True)
    for i, (stage, eta) in enumerate(zip(stages, estimates), start=1):
        done = stage.recipe is not None and left[stage.key] < stage.steps
        state = "done" if done and left[stage.key] <= 0 else f"~{eta / 60:.1f} min" + (
            f", {left[stage.key]} steps left" if done else "")
        print(f"[demo]   stage {i}/{len(stages)}: {stage.title} ({state})", flush=True)
    runs, results = [], {}
    for i, (stage, eta) in enumerate(zip(stages, estimates), start=1):
        print(f"[demo] stage {i}/{len(stages)}: {stage.title} (~{eta / 60:.1f} min)", flush=True)
        if stage.recipe is not None:
            runs.append((stage.key, pretrain(stage.recipe, out / stage.key, stage.steps, device, overrides)))
        elif stage.key == "probes":
            results = probe_all(out, runs, train_limit, device)
        write_report(out, runs, results, train_limit, done=i, total=len(stages))
    summary = {"runs": {key: {k: v for k, v in r.items() if k in ("name", "steps", "wall_s")} for key, r in runs},
               "results": results, "n_probe_train": train_limit}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] wrote {out / 'report.md'}", flush=True)
    return summary


def pretrain(recipe: Path, out: Path, steps: int, device: str | None, overrides=()) -> dict:
    from mimkit.config import load_config
    from mimkit.engine.logging import read_metrics
    from mimkit.engine.trainer import Trainer
    cfg = load_config(recipe, DEMO_OVERRIDES + list(overrides) + [f"train.steps={steps}"])
    trainer = Trainer(cfg, out, resume=True, device=device)  # re-running the demo continues, never overwrites
    trainer.train()
    rows = [r for r in read_metrics(out) if "loss" in r]
    wall, previous = 0.0, 0   # pre-training time summed over log intervals (also across resumed sessions)
    for r in rows:
        wall += (r["step"] - previous) * cfg.data.batch_size / max(r["img_per_s"], 1e-9)
        previous = r["step"]
    return {"name": cfg.method["name"], "cfg": cfg, "trainer": trainer, "rows": rows, "steps": steps,
            "wall_s": round(wall, 1), "out": out}


def probe_all(out: Path, runs, train_limit, device) -> dict:
    """Probe results by encoder name; kept in RUN/probes.json (keyed by run and step), so a re-run skips them."""
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
    cache_path = out / "probes.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    results = {}
    for name, model in subjects.items():
        key = f"{name} | train {train_limit}"
        if key not in cache:
            start = time.time()
            tr = extract_features(model, train_part, cfg.model.img_size, mean, std, cfg.model.pool,
                                  device=trainer.device)
            te = extract_features(model, test_set, cfg.model.img_size, mean, std, cfg.model.pool,
                                  device=trainer.device)
            cache[key] = {"knn_top1": round(knn_top1(*tr, *te, k=20), 2),
                          "linear_top1": round(linear_probe_top1(*tr, *te), 2), "feature_dim": tr[0].shape[1],
                          "probe_s": round(time.time() - start, 1)}
            cache_path.write_text(json.dumps(cache, indent=2))
        results[name] = cache[key]
        print(f"[demo] {name}: {results[name]}", flush=True)
    return results


def label(key: str, run: dict) -> str:
    what = {"vision_electra": "Vision ELECTRA discriminator", "mae": "MAE encoder", "simmim": "SimMIM encoder"}
    suffix = {"main": "", "mae-equal-steps": " (equal steps)", "mae-equal-flops": " (equal training FLOPs)"}[key]
    return f"{what.get(run['name'], run['name'])}{suffix}, {run['steps']} steps"


def write_report(out: Path, runs, results: dict, train_limit, done: int, total: int) -> None:
    """RUN/report.md with whatever is finished (rewritten after every stage)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# mimkit demo on Fashion-MNIST", "",
             f"Stages finished: {done} of {total}" + ("" if done == total else " (re-run the demo to continue)"), ""]
    if results:
        random = results.get("random init (same architecture)")
        lines += ["Each encoder is frozen; probes use its pooled features: k-NN (k=20, weighted vote) and a linear "
                  f"probe (BatchNorm without affine + linear layer, SGD, 30 epochs), trained on {train_limit or 'all'} "
                  "train images and measured on the 10,000 test images.", "",
                  "| encoder | k-NN top-1 (%) | linear top-1 (%) | vs random init (k-NN / linear) |",
                  "|---|---|---|---|"]
        for name, r in results.items():
            gap = (f"{r['knn_top1'] - random['knn_top1']:+.1f} / {r['linear_top1'] - random['linear_top1']:+.1f}"
                   if random and name not in ("raw pixels",) and r is not random else "")
            lines.append(f"| {name} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | {gap} |")
        lines += ["", RAW_PIXELS_NOTE]
    for key, run in runs:
        rows = run["rows"]
        parts = [k for k in rows[-1] if k.startswith(("loss", "acc_"))]
        lines += ["", f"## {label(key, run)}", "", f"Run directory `{run['out']}`; batch {run['cfg'].data.batch_size}, "
                  f"{run['wall_s']:.0f} s of pre-training, ~{sum(r['img_per_s'] for r in rows) / len(rows):.0f} "
                  "images/s on this machine.", "", "| step | " + " | ".join(parts) + " |", "|---" * (len(parts) + 1) + "|"]
        picked = rows[:: max(1, len(rows) // 6)]
        picked += [rows[-1]] if picked[-1] is not rows[-1] else []
        for r in picked:
            lines.append(f"| {r['step']} | " + " | ".join(f"{r[p]:.4f}" for p in parts) + " |")
        curves, grid = run["out"] / "loss-curves.png", run["out"] / "samples" / "final.png"
        if curves.exists():
            lines += ["", "Loss curves:", "", f"![{key} losses]({curves.relative_to(out)})"]
        lines += ["", "Reconstructions of fixed test images (row titles in the picture):", "",
                  f"![{key}]({grid.relative_to(out)})"]
    if runs:
        lines += ["", "## Settings of the main run", "", "```yaml",
                  yaml.safe_dump(runs[0][1]["cfg"].to_dict(), sort_keys=False).rstrip(), "```", ""]
    (out / "report.md").write_text("\n".join(lines))
