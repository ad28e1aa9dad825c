"""Held-out validation (data.val_split / --val-data, train.val_every, train.keep_best): the held-out images are never
trained on, the loss on them is fixed per image (the same checkpoint gives the same value), and best.pt follows the
lowest logged val/loss through a resume."""
import pytest
import torch

from mimkit.data.transforms import Augmented
from mimkit.engine.checkpoint import load_checkpoint
from mimkit.engine.trainer import Trainer
from tests.conftest import metrics_rows, tiny_config, train_cut_and_resume

VAL = ["model.size=pico", "data.val_split=0.1", "train.val_every=5", "train.val_limit=96", "train.sample_every=0"]


def test_held_out_images_are_never_in_a_training_batch(fmnist_small, tmp_path, monkeypatch):
    cfg = tiny_config(fmnist_small, "mae", VAL + ["data.batch_size=64"])
    trainer = Trainer(cfg, tmp_path / "run")
    held = set(trainer.val_indices.tolist())
    every_held = set(range(2048)) - set(trainer.train_indices.tolist())
    assert len(every_held) == round(2048 * 0.1) and held <= every_held and len(held) == 96
    seen = []
    real = Augmented.__getitem__
    monkeypatch.setattr(Augmented, "__getitem__", lambda self, item: seen.append(item[0]) or real(self, item))
    batches = trainer._micro_batches(0)
    for _ in range(trainer.steps_per_epoch):                  # one whole epoch
        next(batches)
    assert len(seen) == trainer.steps_per_epoch * 64 and len(set(seen)) == len(seen)
    assert not set(seen) & every_held
    grid = trainer.sample_images                              # the reconstruction grid shows held-out images
    from mimkit.data import EvalTransform
    first = trainer._normalise(EvalTransform(cfg.model.img_size)(trainer.dataset[int(trainer.val_indices[0])][0])[None])
    assert torch.equal(grid[:1], first)


def test_the_held_out_loss_is_fixed_per_image_and_moves_with_training(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", VAL + ["model.drop_path=0.1"])
    trainer = Trainer(cfg, tmp_path / "run")
    first, again = trainer.validate(0), trainer.validate(0)
    assert first == again and first["val/loss"] > 0 and "val/loss_mse" in first
    trainer.train(stop_after=1)
    assert trainer.validate(1)["val/loss"] != pytest.approx(first["val/loss"], abs=1e-6)


def test_best_pt_is_the_lowest_val_loss_and_a_resume_keeps_tracking_it(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", VAL + ["train.steps=20", "train.keep_best=val/loss",
                                                  "optim.base_lr=0.02"])      # a high lr: the curve is not monotone
    full, cut = train_cut_and_resume(cfg, tmp_path, cut_at=12)
    for run in ("full", "cut"):
        rows = [r for r in metrics_rows(tmp_path / run) if "val/loss" in r]
        assert [r["step"] for r in rows] == [5, 10, 15, 20]
        lowest = min(rows, key=lambda r: r["val/loss"])
        best = load_checkpoint(tmp_path / run / "best.pt")
        assert best["step"] == lowest["step"] and best["best"]["value"] == pytest.approx(lowest["val/loss"])
        assert load_checkpoint(tmp_path / run / "last.pt")["best"]["step"] == lowest["step"]
    assert [r.get("val/loss") for r in metrics_rows(tmp_path / "cut")] == \
        pytest.approx([r.get("val/loss") for r in metrics_rows(tmp_path / "full")], abs=1e-5)


def test_a_shard_stream_takes_its_held_out_images_from_val_data(tmp_path, capsys):
    """A shard stream has no random access, so data.val_split is refused with the fix; --val-data gives held-out
    images from elsewhere (by construction never in the stream) and the run logs val/loss."""
    from mimkit.cli import main
    from mimkit.data.shards import pack_shards
    from tests.test_shards import image_folder
    pack_shards(f"folder:{image_folder(tmp_path / 'train', 96)}", tmp_path / "shards", max_count=32)
    held = image_folder(tmp_path / "held", 40, seed=1)
    base = ["pretrain", "--config", "configs/mae_vit-mini_fmnist-tiny.yaml", "--data", f"shards:{tmp_path / 'shards'}",
            "--steps", "2", "--device", "cpu", "model.size=pico", "data.batch_size=16", "data.num_workers=0",
            "train.sample_every=0", "train.val_every=2", "train.val_limit=32"]
    assert main(base + ["--out", str(tmp_path / "a"), "data.val_split=0.1"]) == 2
    assert "a shard stream has no random access: give the held-out images with --val-data" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--val-data", f"folder:{held}"]) == 0
    assert [r["step"] for r in metrics_rows(tmp_path / "b") if "val/loss" in r] == [2]


def test_rankme_alone_measures_the_held_out_images(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", VAL + ["train.online_probe=rankme", "train.probe_test=50"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.probe.test.indices == trainer.val_indices[:50].tolist()
    assert trainer.probe.describe() == "online probe: rankme on 50 images, no labels"
    row = trainer.probe(trainer.method.encoder.model)
    assert row["probe/rankme"] > 1 and row["probe/feature_spread"] > 0
