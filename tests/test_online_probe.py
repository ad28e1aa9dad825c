"""The online probe: logged before training and every `probe_every` steps, equal to an offline k-NN of the same
encoder on the same images, and invisible to the training itself."""
import pytest
import torch

from mimkit.config import ConfigError, load_config
from mimkit.data.datasets import DataError, build_dataset
from mimkit.engine.trainer import Trainer
from mimkit.eval.features import extract_features, labels_of, subset
from mimkit.eval.knn import knn_top1
from tests.conftest import MAE_PICO, metrics_rows


def small_run(fmnist_small, extra=()):
    return load_config(None, MAE_PICO + [f"data.spec=idx:{fmnist_small}", "data.batch_size=256", "data.num_workers=0",
                                         "optim.warmup_epochs=0", "train.log_every=2", "train.ckpt_every=1000",
                                         "train.sample_every=0", "train.steps=5"] + list(extra))


def test_online_probe_is_logged_matches_an_offline_knn_and_leaves_training_alone(fmnist_small, tmp_path):
    probe = ["train.online_probe=knn,linear", "train.probe_every=3", "train.probe_train=300", "train.probe_test=200"]
    trainer = Trainer(small_run(fmnist_small, probe), tmp_path / "probe", quiet=True)
    trainer.train()
    rows = metrics_rows(tmp_path / "probe")
    probed = {r["step"]: r for r in rows if "probe/knn_top1" in r}
    assert sorted(probed) == [0, 3, 5]                     # before training, every 3 steps, at the end
    assert "loss" not in probed[3] and "loss" in probed[5]  # its own row off the log steps, merged on them
    assert all(0 <= r["probe/linear_top1"] <= 100 and r["probe/seconds"] > 0 for r in probed.values())

    data = build_dataset(f"idx:{fmnist_small}", "train")
    test = build_dataset(f"idx:{fmnist_small}", "test")
    train_sub, test_sub = subset(data, 300, seed=0), subset(test, 200, seed=1)
    mean, std = trainer.mean.flatten().tolist(), trainer.std.flatten().tolist()
    encoder = trainer.method.encoder.model
    feats = [extract_features(encoder, d, [28, 28], mean, std, "cls")[0] for d in (train_sub, test_sub)]
    assert probed[5]["probe/knn_top1"] == pytest.approx(knn_top1(feats[0], labels_of(train_sub), feats[1],
                                                                 labels_of(test_sub)))

    Trainer(small_run(fmnist_small), tmp_path / "plain", quiet=True).train()
    plain = [r["loss"] for r in metrics_rows(tmp_path / "plain")]
    assert [r["loss"] for r in rows if "loss" in r] == plain   # same losses, bit for bit: the probe forks the RNG


def test_online_probe_needs_labels_and_valid_settings(fmnist_small, tmp_path):
    cfg = small_run(fmnist_small, ["train.online_probe=knn", "train.probe_data=synthetic:1x28x28"])
    with pytest.raises(DataError, match="needs labelled images"):
        Trainer(cfg, tmp_path / "x", quiet=True)
    with pytest.raises(ConfigError, match="train.online_probe='svm' is out of range"):
        load_config(None, MAE_PICO + ["train.online_probe=svm"])
    with pytest.raises(ConfigError, match="probe_every"):
        load_config(None, MAE_PICO + ["train.online_probe=knn", "train.probe_every=0"])


def test_probe_does_not_touch_the_global_rng(fmnist_small, tmp_path):
    trainer = Trainer(small_run(fmnist_small, ["train.online_probe=knn,linear", "train.probe_train=50",
                                              "train.probe_test=20"]), tmp_path / "r", quiet=True)
    state = torch.get_rng_state()
    trainer._online_probe(0)
    assert torch.equal(state, torch.get_rng_state())
