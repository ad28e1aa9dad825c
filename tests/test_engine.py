import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mimkit.engine.checkpoint import load_checkpoint
from mimkit.engine.trainer import Trainer, TrainingDiverged
from tests.conftest import REPO, tiny_config


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_tiny_pretraining_loss_falls_and_logs_everything(fmnist_small, tmp_path, method):
    cfg = tiny_config(fmnist_small, method, ["train.steps=60", "train.log_every=10", "train.sample_every=30"])
    Trainer(cfg, tmp_path / "run").train()
    log = rows(tmp_path / "run")
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    part = "loss_mse" if method == "mae" else "loss_l1"
    for key in ("step", "loss", part, "lr", "img_per_s", "grad_norm_model", "nonfinite_steps", "skipped_images"):
        assert key in log[0], key
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], [r["loss"] for r in log]
    assert (tmp_path / "run/samples/step-0000030.png").exists() and (tmp_path / "run/samples/final.png").exists()
    assert any((tmp_path / "run/tb").iterdir())
    ckpt = torch.load(tmp_path / "run/last.pt", weights_only=True)   # plain data only
    assert ckpt["step"] == 60 and set(ckpt) >= {"model", "optimizers", "rng", "config"}


def test_resume_reproduces_uninterrupted_losses(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", ["train.steps=8", "data.batch_size=16", "model.drop_path=0.1"])
    Trainer(cfg, tmp_path / "full").train()
    Trainer(cfg, tmp_path / "cut").train(stop_after=3)
    assert load_checkpoint(tmp_path / "cut/last.pt")["step"] == 3
    Trainer(cfg, tmp_path / "cut", resume=True).train()
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))
    for a, b in zip(full, cut):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    assert abs(full[-1]["loss"] - full[3]["loss"]) > 1e-4  # the steps differ, so the check has teeth


def test_existing_run_needs_resume(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", ["train.steps=1"])
    Trainer(cfg, tmp_path / "run").train()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg, tmp_path / "run")


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", ["train.steps=10", "train.nan_patience=3"])
    trainer = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    real = trainer.method

    def poisoned(x, stage, carry):
        out = real(x, stage=stage, carry=carry)
        return {"loss": out["loss"] * float("nan"), "parts": out["parts"]}

    trainer.forward = poisoned
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        trainer.train()
    after = trainer.method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # no update was applied
    assert rows(tmp_path / "run")[-1]["nonfinite_steps"] == 3


@pytest.mark.parametrize("recipe", ["mae_vit-mini_fmnist-tiny.yaml", "vision-electra_vit-mini_fmnist-tiny.yaml"])
def test_sigkill_then_resume_finishes_the_run(fmnist_small, tmp_path, recipe):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mimkit.cli", "pretrain", "--out", str(run), "--config",
           str(REPO / "configs" / recipe), "--data", f"idx:{fmnist_small}", "--steps", "40",
           "--ckpt-every", "4", "model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1",
           "data.batch_size=32", "data.num_workers=0", "train.log_every=1", "train.sample_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "last.pt").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run / "last.pt")["step"]
    assert 4 <= killed_at < 40
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} from step {killed_at}" in done.stdout
    assert [r["step"] for r in rows(run)] == list(range(1, 41))
    assert load_checkpoint(run / "last.pt")["step"] == 40
    assert not list(run.glob(".*tmp*"))  # atomic writes leave no partial files
