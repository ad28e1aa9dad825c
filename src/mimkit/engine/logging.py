"""Run outputs: metrics.jsonl, TensorBoard scalars and images, console lines, reconstruction grids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from torchvision.utils import make_grid, save_image


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


def save_rows_grid(rows: list[tuple[str, torch.Tensor]], mean, std, path: Path, min_tile: int = 84) -> torch.Tensor:
    """Saves a grid with one row per entry (e.g. original | masked | reconstruction) and returns it."""
    shown = [x.clamp(0, 1) if isinstance(row, RenderedRow) else to_display(x, mean, std)
             for row in rows for x in [row[1].float().cpu()]]
    scale = -(-min_tile // shown[0].shape[-2])  # small images (28 px) are enlarged to be seen
    if scale > 1:
        shown = [torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest") for x in shown]
    if any(x.shape[1] != shown[0].shape[1] for x in shown):
        shown = [x.expand(-1, 3, -1, -1) for x in shown]
    grid = make_grid(torch.cat(shown), nrow=shown[0].shape[0], padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid
