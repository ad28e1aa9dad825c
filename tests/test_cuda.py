"""On a CUDA machine: bf16 autocast training of every method, fused AdamW, masks made on the GPU.
Skipped where there is no GPU (CI); run on the lent H100 before a release."""
import json

import pytest
import torch

from mimkit.engine.trainer import Trainer
from mimkit.masking import block_mask, random_mask, simmim_mask
from tests.conftest import tiny_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
VE = ["method.name=vision_electra", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def test_masks_are_made_on_the_gpu():
    dev = torch.device("cuda")
    assert random_mask(4, (7, 7), 0.75, dev).device.type == "cuda"
    assert block_mask(4, (14, 14), 0.4, dev).device.type == "cuda"
    assert simmim_mask(4, (8, 8), 0.6, 8, (4, 4), dev).device.type == "cuda"


@pytest.mark.parametrize("method,extra", [("mae", []), ("simmim", []), ("mae", VE), ("mae", VE + ["train.compile=true"])])
def test_bf16_training_on_cuda(fmnist_small, tmp_path, method, extra):
    cfg = tiny_config(fmnist_small, method, ["train.steps=60", "train.log_every=10"] + extra)
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.device.type == "cuda" and trainer.fused
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    key = {"mae": "loss_mse", "simmim": "loss_l1"}[method] if not extra else "loss_img"
    assert all(r["nonfinite_steps"] == 0 for r in rows)
    assert rows[-1][key] < 0.8 * rows[0][key], [r[key] for r in rows]
