"""`mimkit eval report RUN_A RUN_B ...`: the chosen protocols on several runs, one row per run and one column
per protocol (like the papers' tables), plus attention and reconstruction PNGs, in OUT/report.md."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROTOCOLS = ("knn", "linear", "linear_lars", "attentive", "recon", "robustness", "finetune", "segment", "detect")
DEFAULT_PROTOCOLS = ("knn", "linear", "attentive", "recon", "robustness")


@dataclass
class Entry:
    label: str
    method: torch.nn.Module        # the whole pre-training method (reconstructions)
    cfg: object
    mean: list
    std: list

    @property
    def encoder(self) -> torch.nn.Module:
        return self.method.encoder.model


def load_entry(spec: str, seed: int = 0) -> Entry:
    """'RUN' or 'RUN/last.pt' (a mimkit run), or 'random:RUN' (that run's architecture, untrained)."""
    from mimkit.engine.checkpoint import load_checkpoint
    from mimkit.export import method_from_checkpoint
    random = spec.startswith("random:")
    path = Path(spec[len("random:"):] if random else spec)
    path = path / "last.pt" if (path / "last.pt").is_file() else path     # a dcp run: the directory itself
    obj = load_checkpoint(path)
    method, cfg = method_from_checkpoint(obj, seed if random else None)
    label = f"random init ({cfg.method['name']} {cfg.model.arch}-{cfg.model.size})" if random else \
        f"{cfg.method['name']} {(path.parent if path.is_file() else path).name} (step {obj['step']})"
    return Entry(label, method.eval(), cfg, obj["data_stats"]["mean"], obj["data_stats"]["std"])


def run_report(specs: list[str], out: str | Path, data: str = "fashion-mnist", protocols=DEFAULT_PROTOCOLS,
               train_limit: int | None = 5000, test_limit: int | None = 2000, severities=(1, 3, 5),
               finetune_epochs: int | None = None, finetune_recipe: str | None = None, device: str = "cpu",
               seed: int = 0, log=print,
               inception_weights: str | None = None, fid_encoder: str | None = None, segment_data: str | None = None,
               segment_recipe: str | None = None, segment_steps: int | None = None, detect_data: str | None = None,
               detect_recipe: str | None = None, detect_steps: int | None = None) -> list[dict]:
    from mimkit.data import build_dataset
    from mimkit.engine.logging import read_metrics, save_loss_curves
    from mimkit.eval import extract_features, knn_top1
    from mimkit.eval.attention import save_attention_grid
    from mimkit.eval.attentive import CPU_SMALL, attentive_probe_top1, load_attentive_recipe
    from mimkit.eval.features import labels_of, subset
    from mimkit.eval.linear import ProbedClassifier, linear_probe, linear_probe_top1
    from mimkit.eval.recon import fid_feature_network, reconstruction_metrics
    from mimkit.eval.robustness import corruption_accuracy, corruption_errors

    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(sorted(unknown))}; choose from {', '.join(PROTOCOLS)}")
    if "segment" in protocols and not segment_data:
        raise ValueError("the segment protocol needs --segment-data seg:DIR; 'mimkit data make-segmentation --out DIR' "
                         "builds one from Fashion-MNIST")
    if "detect" in protocols and not detect_data:
        raise ValueError("the detect protocol needs --detect-data coco:DIR; 'mimkit data make-detection --out DIR' "
                         "builds one from Fashion-MNIST")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = build_dataset(data, "train"), build_dataset(data, "test")
    train_part, test_part = subset(train_set, train_limit, seed), subset(test_set, test_limit, seed)
    num_classes = int(labels_of(train_set).max()) + 1
    rows, baseline_table = [], None
    for i, spec in enumerate(specs):
        entry = load_entry(spec, seed)
        cfg, enc = entry.cfg, entry.encoder
        size, pool = cfg.model.img_size, cfg.model.pool
        row = {"run": entry.label, "spec": spec}
        start = time.time()
        log(f"[report] {entry.label}")
        tr = extract_features(enc, train_part, size, entry.mean, entry.std, pool, device=device)
        te = extract_features(enc, test_part, size, entry.mean, entry.std, pool, device=device)
        if "knn" in protocols:
            row["knn"] = knn_top1(*tr, *te, k=20)
        if "linear" in protocols:
            row["linear"] = linear_probe_top1(*tr, *te, seed=seed)
        if "linear_lars" in protocols:
            row["linear_lars"] = linear_probe_top1(*tr, *te, optimizer="lars", batch_size=4096, epochs=90, seed=seed)
        if "attentive" in protocols and cfg.model.arch == "vit":
            tr_t = extract_features(enc, train_part, size, entry.mean, entry.std, "tokens", device=device)
            te_t = extract_features(enc, test_part, size, entry.mean, entry.std, "tokens", device=device)
            small = load_attentive_recipe(CPU_SMALL)     # mimkit's cached CPU probe, not CAE's protocol
            row["attentive"] = attentive_probe_top1(*tr_t, *te_t, num_heads=enc.blocks[0].attn.num_heads, seed=seed,
                                                    epochs=small.epochs, batch_size=small.batch_size,
                                                    lr=small.lr * small.batch_size / small.lr_batch,
                                                    warmup_epochs=small.epochs / 9)
        if "recon" in protocols:
            row["recon"] = reconstruction_metrics(entry.method, test_part, size, entry.mean, entry.std,
                                                  num_images=min(500, len(test_part)), device=device,
                                                  inception_weights=inception_weights,
                                                  fid_encoder=fid_feature_network(fid_encoder),
                                                  fid_encoder_name=fid_encoder or "")
        if "robustness" in protocols:
            head = linear_probe(tr[0], tr[1], num_classes, seed=seed)
            table = corruption_accuracy(ProbedClassifier(enc, head, pool), test_part, size, entry.mean, entry.std,
                                        severities=severities, device=device, seed=seed)
            baseline_table = baseline_table or table
            row["robustness"] = {"clean": table["clean"], "table": table, "ce": corruption_errors(table, baseline_table)}
        if "finetune" in protocols:
            from mimkit.config import build_dataclass, load_yaml
            from mimkit.eval.finetune import FinetuneConfig, classifier_from_encoder, finetune
            ft_cfg = build_dataclass(FinetuneConfig, load_yaml(finetune_recipe)) if finetune_recipe else \
                FinetuneConfig(epochs=3, batch_size=64, base_lr=1e-3, warmup_epochs=1, num_workers=0)
            ft_cfg.epochs, ft_cfg.seed = finetune_epochs or ft_cfg.epochs, seed
            spec_enc = entry.method.encoder
            model = classifier_from_encoder(spec_enc.timm_name, spec_enc.timm_kwargs, enc.state_dict(), num_classes, ft_cfg)
            row["finetune"] = {k: v for k, v in finetune(model, train_part, test_part, size, entry.mean, entry.std,
                                                            ft_cfg, device, log).items() if k != "history"}
        if "segment" in protocols:
            from mimkit.eval.segment import CPU_RECIPE, load_segment_recipe, segment_transfer
            seg_cfg = load_segment_recipe(segment_recipe or CPU_RECIPE,
                                          [f"steps={segment_steps}"] if segment_steps else [])
            spec_enc = entry.method.encoder
            found = segment_transfer((spec_enc.timm_name, spec_enc.timm_kwargs), enc.state_dict(), entry.label,
                                     segment_data, seg_cfg, out / f"segment-{i}", entry.mean, entry.std, device,
                                     quiet=True, log=log)
            row["segment"] = {k: found[k] for k in ("miou", "pixel_acc", "steps", "head", "wall_s")}
            row["segment_png"] = f"segment-{i}/segment-examples.png"
        if "detect" in protocols:
            from mimkit.eval.detect import CPU_RECIPE as DETECT_CPU_RECIPE
            from mimkit.eval.detect import detect_transfer, load_detect_recipe
            det_cfg = load_detect_recipe(detect_recipe or DETECT_CPU_RECIPE, [f"steps={detect_steps}"] if detect_steps else [])
            spec_enc = entry.method.encoder
            found = detect_transfer((spec_enc.timm_name, spec_enc.timm_kwargs), enc.state_dict(), entry.label,
                                    detect_data, det_cfg, out / f"detect-{i}", entry.mean, entry.std, device,
                                    quiet=True, log=log)
            row["detect"] = {k: found[k] for k in ("box_ap", "box_ap50", "mask_ap", "mask_ap50", "steps", "wall_s")}
            row["detect_png"] = f"detect-{i}/detect-examples.png"
        images = _first_images(test_set, size, entry.mean, entry.std)          # on the CPU
        entry.method.to(device)
        if cfg.model.arch == "vit":
            save_attention_grid(enc, images.to(device), _display(images, entry), enc.patch_embed.grid_size,
                                out / f"attention-{i}.png", title=f"{entry.label}: last-layer CLS attention")
            row["attention_png"] = f"attention-{i}.png"
        save_reconstructions(entry, test_set, out / f"reconstruction-{i}.png", seed=seed, device=device)
        row["reconstruction_png"] = f"reconstruction-{i}.png"
        run_dir = Path(spec[len("random:"):] if spec.startswith("random:") else spec)
        run_dir = run_dir if run_dir.is_dir() else run_dir.parent
        if not spec.startswith("random:") and save_loss_curves([r for r in read_metrics(run_dir) if "loss" in r],
                                                               out / f"loss-curves-{i}.png", entry.label):
            row["loss_curves_png"] = f"loss-curves-{i}.png"
        row["wall_s"] = round(time.time() - start, 1)
        rows.append(row)
    (out / "report.json").write_text(json.dumps(rows, indent=2, default=float))
    (out / "report.md").write_text(render(rows, protocols, data, len(train_part), len(test_part), severities))
    log(f"[report] wrote {out / 'report.md'}")
    return rows


@torch.no_grad()
def save_reconstructions(entry: Entry, dataset, path: Path, count: int = 6, seed: int = 0, device="cpu") -> Path:
    """The method's rows (original | masked | reconstruction | ...) for the first `count` images, seeded masks."""
    from mimkit.engine.logging import save_rows_grid
    images = _first_images(dataset, entry.cfg.model.img_size, entry.mean, entry.std, count)
    torch.manual_seed(seed)
    rows = entry.method.eval().to(device).reconstruction_rows(images.to(device))
    mean_t, std_t = (torch.tensor(v).view(1, -1, 1, 1) for v in (entry.mean, entry.std))
    save_rows_grid(rows, mean_t, std_t, path, title=f"{entry.label}, mask seed {seed}")
    return path


def _feature_network_line(rows: list[dict]) -> list[str]:
    networks = {r["recon"]["feature_network"] for r in rows if r.get("recon")}
    return ["", f"FID / IS feature network: {', '.join(sorted(networks))}."] if networks else []


def _first_images(dataset, size, mean, std, count: int = 6) -> torch.Tensor:
    from mimkit.data import EvalTransform, to_unit_float
    t = EvalTransform(size)
    x = torch.stack([t(dataset[i][0]) for i in range(count)])
    x = to_unit_float(x)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _display(images: torch.Tensor, entry: Entry) -> torch.Tensor:
    return (images * torch.tensor(entry.std).view(1, -1, 1, 1) + torch.tensor(entry.mean).view(1, -1, 1, 1)).clamp(0, 1)


def render(rows: list[dict], protocols, data, train_limit, test_limit, severities) -> str:
    cols = []
    for p in protocols:
        cols += {"knn": ["k-NN"], "linear": ["linear"], "linear_lars": ["linear (LARS)"], "attentive": ["attentive"],
                 "recon": ["L1", "PSNR", "SSIM", "MS-SSIM", "IS", "FID"], "robustness": ["clean (probe)", "mCE"],
                 "finetune": ["fine-tune best", "fine-tune final"], "segment": ["mIoU", "pixel acc."],
                 "detect": ["AP box", "AP50 box", "AP mask", "AP50 mask"]}[p]
    lines = ["# mimkit evaluation report", "",
             f"Data `{data}`; probes trained on {train_limit or 'all'} train images, measured on {test_limit or 'all'} "
             f"test images; top-1 in %. Reconstruction metrics over a fixed set of seeded masks (seed 0). "
             f"Robustness: a linear probe on clean features, corruptions at severities {list(severities)}; "
             f"mCE relative to the first row.", *_feature_network_line(rows), "",
             "| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = []
        for p in protocols:
            if p == "recon":
                m = r.get("recon") or {}
                cells += [_f(m.get("l1"), 4), _f(m.get("psnr"), 2), _f(m.get("ssim"), 4), _f(m.get("ms_ssim"), 4),
                          _f(m.get("inception_score"), 2), _f(m.get("fid"), 2)]
            elif p == "robustness":
                rob = r.get("robustness") or {}
                cells += [_f(rob.get("clean"), 2), _f((rob.get("ce") or {}).get("mCE"), 3)]
            elif p == "finetune":
                ft = r.get("finetune") or {}
                cells += [_f(ft.get("best_top1"), 2), _f(ft.get("final_top1"), 2)]
            elif p == "segment":
                seg = r.get("segment") or {}
                cells += [_f(seg.get("miou"), 2), _f(seg.get("pixel_acc"), 2)]
            elif p == "detect":
                det = r.get("detect") or {}
                cells += [_f(det.get(k), 2) for k in ("box_ap", "box_ap50", "mask_ap", "mask_ap50")]
            else:
                cells.append(_f(r.get(p), 2))
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    if any("robustness" in r for r in rows):
        names = [k for k in rows[0]["robustness"]["table"] if k != "clean"]
        lines += ["", "## Corruption errors (CE, relative to the first row)", "",
                  "| run | " + " | ".join(names) + " | mCE |", "|---" * (len(names) + 2) + "|"]
        for r in rows:
            ce = r["robustness"]["ce"]
            lines.append(f"| {r['run']} | " + " | ".join(f"{ce[n]:.3f}" for n in names) + f" | {ce['mCE']:.3f} |")
    lines += ["", "## Pictures", ""]
    for r in rows:
        lines.append(f"### {r['run']}")
        if "loss_curves_png" in r:
            lines += ["", "Pre-training losses:", "", f"![loss curves]({r['loss_curves_png']})"]
        if "attention_png" in r:
            lines += ["", "Last-layer CLS attention (image | mean over heads | each head):", "", f"![attention]({r['attention_png']})"]
        if "segment_png" in r:
            lines += ["", "Segmentation (image | label | prediction):", "", f"![segmentation]({r['segment_png']})"]
        if "detect_png" in r:
            lines += ["", "Detection (ground truth above, predictions below):", "", f"![detection]({r['detect_png']})"]
        lines += ["", "Reconstructions:", "", f"![reconstruction]({r['reconstruction_png']})", ""]
    return "\n".join(lines) + "\n"


def _f(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
