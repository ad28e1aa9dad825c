"""Run outputs: metrics.jsonl, TensorBoard scalars and images, console lines, and pictures that explain themselves:
reconstruction grids with their title (run, step) and row / column titles drawn in, and loss curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


class MetricsLog:
    """One JSON object per logged step in RUN/metrics.jsonl, mirrored to TensorBoard under RUN/tb."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop rows past the checkpoint we resume from
            rows = [line for line in self.path.read_text(errors="replace").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
                self.writer = None

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl (training rows and probe rows), without lines torn by a crash."""
    path = Path(run) / "metrics.jsonl"
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line torn by a crash or power loss."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


def to_display(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised [B, C, H, W] -> [B, 1 or 3, H, W] in [0, 1]; more than 3 channels shows the first 3."""
    x = (images.float() * std.to(images.device) + mean.to(images.device)).clamp(0, 1)
    if x.shape[1] == 2:
        x = x[:, :1]
    return x[:, :3] if x.shape[1] > 3 else x


class RenderedRow(NamedTuple):
    """A sample-grid row already rendered for display (RGB in [0, 1], e.g. a heat map), not normalised data."""
    label: str
    image: torch.Tensor


def save_rows_grid(rows: list[tuple[str, torch.Tensor]], mean, std, path: Path, min_tile: int = 84,
                   title: str = "", column_titles: list[str] | None = None) -> torch.Tensor:
    """Saves a grid with one row per entry (e.g. original | masked | reconstruction), each row titled with its
    name, and returns it ([3, H, W] in [0, 1])."""
    shown = [x.clamp(0, 1) if isinstance(row, RenderedRow) else to_display(x, mean, std)
             for row in rows for x in [row[1].float().cpu()]]
    if any(x.shape[1] != shown[0].shape[1] for x in shown):
        shown = [x.expand(-1, 3, -1, -1) for x in shown]
    return save_titled_grid(torch.cat(shown), shown[0].shape[0], path, title, [row[0] for row in rows],
                            column_titles or [], min_tile)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)          # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def save_titled_grid(tiles: torch.Tensor, ncol: int, path: Path, title: str = "", row_titles=(), column_titles=(),
                     min_tile: int = 84, padding: int = 2) -> torch.Tensor:
    """Tiles [N, 1|3, h, w] in [0, 1] in rows of `ncol`, small tiles enlarged (nearest) to `min_tile` px, with the
    title above, column titles over the columns and row titles left of the rows; saved as PNG and returned."""
    scale = -(-min_tile // tiles.shape[-2])
    if scale > 1:
        tiles = torch.nn.functional.interpolate(tiles, scale_factor=scale, mode="nearest")
    grid = make_grid(tiles.expand(-1, 3, -1, -1) if tiles.shape[1] == 1 else tiles, nrow=ncol, padding=padding,
                     pad_value=1.0)
    body = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    font, line = _font(), 18
    measure = ImageDraw.Draw(body)
    left = max([measure.textbbox((0, 0), t, font=font)[2] for t in row_titles] + [-8]) + 8
    bands = bool(title) + bool(column_titles)
    top = line * bands + (2 if bands else 0)
    canvas = Image.new("RGB", (left + body.width, top + body.height), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    step_x, step_y = tiles.shape[-1] + padding, tiles.shape[-2] + padding
    for j, text in enumerate(column_titles):
        draw.text((left + padding + j * step_x, top - line + 2), _fit(draw, text, font, step_x), fill="black", font=font)
    for i, text in enumerate(row_titles):
        draw.text((4, top + padding + i * step_y + tiles.shape[-2] // 2 - 7), text, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while len(text) > 1 and draw.textbbox((0, 0), text, font=font)[2] > width - 2:
        text = text[:-1]
    return text


def save_loss_curves(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """One panel per loss (and accuracy) in metrics.jsonl rows, against the step, with the held-out value
    (`val/NAME` rows) drawn beside the training curve where logged; None when nothing was logged."""
    train_rows = [r for r in rows if "loss" in r]
    keys = [k for k in train_rows[-1] if k.startswith(("loss", "acc_", "probe_"))] if train_rows else []
    keys = [k for k in keys if sum(isinstance(r.get(k), (int, float)) for r in train_rows) >= 2][:8]
    if not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    cols = min(len(keys), 4)
    fig = Figure(figsize=(3.2 * cols, 2.6 * -(-len(keys) // cols)), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(-(-len(keys) // cols), cols, i + 1)
        points = [(r["step"], r[key]) for r in train_rows if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), linewidth=1.2, label="train")
        held_out = [(r["step"], r[f"val/{key}"]) for r in rows if isinstance(r.get(f"val/{key}"), (int, float))]
        if held_out:
            ax.plot(*zip(*held_out), linewidth=1.2, marker="o", markersize=3, label="held-out")
            ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
