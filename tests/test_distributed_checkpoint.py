"""train.checkpoint=dcp: sharded step directories behind an atomic `latest` pointer; exact resume, a kill during a
save, async saves, export/eval/--init reading them, and no unpickling of anything but DCP's own index."""
import pickle

import pytest
import torch

import torch.distributed.checkpoint as dcp
from mimkit.cli import main
from mimkit.engine.checkpoint import CheckpointError, load_checkpoint
from mimkit.engine.trainer import Trainer
from tests.conftest import assert_export_is_the_result, metrics_rows, tiny_config, train_cut_and_resume

DCP = ["model.size=pico", "train.steps=6", "train.ckpt_every=3", "train.checkpoint=dcp", "train.log_every=1",
       "train.sample_every=0", "model.drop_path=0.1"]


def test_a_dcp_run_resumes_exactly_and_export_and_init_read_it(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", DCP)
    full, cut = train_cut_and_resume(cfg, tmp_path)
    assert [r["step"] for r in cut] == list(range(1, 7))
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in full], abs=1e-5)
    run = tmp_path / "cut"
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006"]   # step 3's was removed
    assert not (run / "last.pt").exists()
    whole, reference = load_checkpoint(run), load_checkpoint(tmp_path / "full")
    assert whole["step"] == 6 and whole["checkpoint"] == "dcp" and whole["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.allclose(whole["model"][key], value, atol=1e-6), key
    assert load_checkpoint(run / "latest")["step"] == 6 == load_checkpoint(run / "checkpoints/step-0000006")["step"]
    assert_export_is_the_result(run, tmp_path / "export")
    data = ["--data", f"idx:{fmnist_small}"]
    assert main(["eval", "knn", "--ckpt", str(run), *data]) == 0
    assert main(["eval", "report", str(run), "--protocols", "knn", "--train-limit", "300", "--test-limit", "100",
                 "--severities", "5", "--out", str(tmp_path / "rep"), *data]) == 0
    assert "mae cut (step 6)" in (tmp_path / "rep" / "report.md").read_text()
    assert main(["pretrain", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "init"), "--init",
                 str(run), "--steps", "1", "--device", "cpu", "train.checkpoint=whole"]) == 0


def test_a_kill_during_a_dcp_save_leaves_the_previous_checkpoint_loadable(fmnist_small, tmp_path, monkeypatch):
    """The step-6 save dies after writing part of its shards (as a SIGKILL would): `latest` still names step 3,
    which loads; the resumed run re-saves step 6 over the torn directory and equals the uninterrupted run."""
    cfg = tiny_config(fmnist_small, "mae", DCP)
    Trainer(cfg, tmp_path / "full").train()
    real_save = dcp.save

    def torn_save(state, checkpoint_id, **kwargs):
        if checkpoint_id.endswith("step-0000006"):
            real_save({"model": dict(list(state["model"].items())[:3])}, checkpoint_id=checkpoint_id, **kwargs)
            raise KeyboardInterrupt("killed while saving")
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)
    monkeypatch.setattr(dcp, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "run").train()
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000003"
    assert (run / "checkpoints/step-0000006").is_dir() and not (run / "checkpoints/step-0000006/meta.pt").exists()
    assert load_checkpoint(run)["step"] == 3
    monkeypatch.setattr(dcp, "save", real_save)
    Trainer(cfg, run, resume=True).train()
    assert load_checkpoint(run)["step"] == 6
    assert [r["loss"] for r in metrics_rows(run)] == pytest.approx([r["loss"] for r in metrics_rows(tmp_path / "full")],
                                                                   abs=1e-5)


def test_an_async_dcp_save_becomes_current_when_it_has_finished(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", DCP + ["train.async_checkpoint=true", "train.keep_every=3"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(stop_after=4)       # step 3's save was in flight; the stop at 4 saves again and waits
    assert trainer.checkpointer.pending is None
    assert (tmp_path / "run/latest").read_text().strip() == "checkpoints/step-0000004"
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-0000003", "step-0000004"]
    Trainer(cfg, tmp_path / "run", resume=True).train()
    assert load_checkpoint(tmp_path / "run")["step"] == 6


def test_a_dcp_index_holding_anything_but_its_own_metadata_is_not_unpickled(tmp_path):
    step = tmp_path / "checkpoints" / "step-0000001"
    step.mkdir(parents=True)
    torch.save({"format": "mimkit-run", "step": 1}, step / "meta.pt")
    (tmp_path / "latest").write_text("checkpoints/step-0000001\n")

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    (step / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="holds io.open, which a checkpoint has no reason to hold"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "latest").write_text("checkpoints/step-0000009\n")
    with pytest.raises(CheckpointError, match="which holds no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_under_dcp_best_is_a_step_directory_pointed_at_like_latest(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", DCP + ["data.val_split=0.1", "train.val_every=2", "train.val_limit=64",
                                                  "train.keep_best=val/loss", "optim.base_lr=0.05", "train.steps=8"])
    Trainer(cfg, tmp_path / "run").train()
    run = tmp_path / "run"
    rows = [r for r in metrics_rows(run) if "val/loss" in r]
    lowest = min(rows, key=lambda r: r["val/loss"])["step"]
    assert (run / "best").read_text().strip() == f"checkpoints/step-{lowest:07d}" and not (run / "best.pt").exists()
    best = load_checkpoint(run / "best")
    assert best["step"] == lowest and best["best"]["value"] == pytest.approx(min(r["val/loss"] for r in rows))
    kept = {f"step-{lowest:07d}", "step-0000008"}
    assert {p.name for p in (run / "checkpoints").iterdir()} == kept        # every other step directory removed
