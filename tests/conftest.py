"""Shared fixtures: tiny models, a small IDX copy of Fashion-MNIST, and IDX writing."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # pytest-xdist runs one worker per core
REPO = Path(__file__).resolve().parents[1]
FMNIST = Path(os.environ.get("MIMKIT_DATA_DIR", "/usr/share/datasets/fashion-mnist"))

MAE_PICO = ["model.size=pico", "model.img_size=[28,28]", "model.patch_size=4", "method.name=mae",
            "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
SIMMIM_PICO = ["model.size=pico", "model.img_size=[28,28]", "model.patch_size=4", "method.name=simmim",
               "method.mask_patch_size=4"]


@pytest.fixture(autouse=True)
def cpu_by_default(monkeypatch, request):
    """The suite is specified on the CPU (CI has no GPU; resume equality is a CPU guarantee); tests marked
    `cuda` run on the GPU where there is one."""
    if "cuda" not in request.keywords:
        monkeypatch.setenv("MIMKIT_DEVICE", "cpu")


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """2,048 train / 1,000 test Fashion-MNIST images as an IDX folder (fast epochs, real images)."""
    from mimkit.data.datasets import read_idx, write_idx
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is missing: run 'bash scripts/setup.sh' (installs dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist_small")
    rng = np.random.default_rng(0)
    for split, prefix, count in (("train", "train", 2048), ("test", "t10k", 1000)):
        images = read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
        pick = np.sort(rng.choice(len(images), count, replace=False))
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[pick])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[pick])
    return out


def tiny_config(data_dir: Path, method: str = "mae", extra: list[str] | None = None):
    from mimkit.config import load_config
    base = MAE_PICO if method == "mae" else SIMMIM_PICO
    return load_config(None, base + [f"data.spec=idx:{data_dir}", "data.batch_size=32", "data.num_workers=0",
                                     "data.crop_scale=[0.5,1.0]", "optim.base_lr=2e-3", "optim.warmup_epochs=0",
                                     "train.log_every=1", "train.ckpt_every=1000", "train.sample_every=0"]
                       + (extra or []))


def metrics_rows(run: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_cut_and_resume(cfg, tmp_path: Path, cut_at: int = 3) -> tuple[list[dict], list[dict]]:
    """Trains `cfg` uninterrupted and, separately, stopped after `cut_at` steps then resumed; returns both logs."""
    from mimkit.engine.trainer import Trainer
    Trainer(cfg, tmp_path / "full").train()
    Trainer(cfg, tmp_path / "cut").train(stop_after=cut_at)
    Trainer(cfg, tmp_path / "cut", resume=True).train()
    return metrics_rows(tmp_path / "full"), metrics_rows(tmp_path / "cut")


def assert_export_is_the_result(ckpt: Path, out: Path, result=lambda method: method.encoder) -> None:
    """`mimkit export` of a run writes the backbone `result(method)` picks: the timm model it loads back computes the
    same features to 1e-5, as does `load_encoder` on the run checkpoint itself."""
    from mimkit import load_encoder
    from mimkit.engine.checkpoint import load_checkpoint
    from mimkit.export import export_encoder, method_from_checkpoint
    weights, _ = export_encoder(ckpt, out)
    method, cfg = method_from_checkpoint(load_checkpoint(ckpt))
    x = torch.randn(2, method.encoder.in_chans, *cfg.model.img_size)
    with torch.no_grad():
        expected = result(method).model.eval().forward_features(x)
        assert torch.allclose(load_encoder(weights).forward_features(x), expected, atol=1e-5)
        assert torch.allclose(load_encoder(ckpt).forward_features(x), expected, atol=1e-5)


def freeze_mask(method, images):
    """Draws the method's mask for `images` once and makes `method.mask` return it from then on."""
    mask = method.mask(images)
    method.mask = lambda x: mask
    return mask


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A random-weight tiny d-VAE (64 codes, 28 px -> 7x7) saved as a tokenizer file."""
    from mimkit.tokenizers import DiscreteVAE, save_tokenizer
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("tok") / "dvae.safetensors"
    save_tokenizer(DiscreteVAE(1, 64, 16, 16, 3, 1, [28, 28]), path)
    return path
