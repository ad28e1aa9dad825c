"""The command line: each bad input gives one sentence (exit 2), never a traceback."""
import json

import numpy as np
from PIL import Image

from mimkit.cli import main
from tests.conftest import REPO

RECIPE = str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml")
TINY = ["model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1", "data.batch_size=8",
        "data.num_workers=0", "train.log_every=1", "train.sample_every=0"]


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimkit: error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_missing_dataset_dir(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MIMKIT_DATA_DIR", str(tmp_path / "none"))
    err = error_of(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "r")])
    assert "does not exist" in err and "apt-get install -y dataset-fashion-mnist" in err


def test_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "r"),
                            "--data", f"folder:{tmp_path / 'empty'}"])
    assert "no images" in err


def test_unknown_config_key(capsys, tmp_path):
    err = error_of(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "r"), "train.ckpt_evry=3"])
    assert "did you mean 'train.ckpt_every'" in err


def test_init_with_other_channel_count(capsys, tmp_path, fmnist_small):
    from tests.test_export import official_mae_state_dict
    import torch
    torch.save({"model": official_mae_state_dict(True, in_chans=3)}, tmp_path / "rgb.pth")
    err = error_of(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "r"), "--data",
                            f"idx:{fmnist_small}", "--init", str(tmp_path / "rgb.pth"), *TINY])
    assert "3-channel" in err


def test_corrupt_images_are_skipped_and_counted(capsys, tmp_path, recwarn):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(16):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(data / f"{i:02d}.png")
    (data / "03.png").write_bytes(b"\x89PNG broken")
    run = tmp_path / "r"
    assert main(["pretrain", "--config", RECIPE, "--out", str(run), "--data", f"folder:{data}", "--steps", "4",
                 *TINY]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] >= 1
    assert any("could not be decoded" in str(w.message) for w in recwarn)


def test_pretrain_export_and_probe_commands(capsys, tmp_path, fmnist_small):
    run = tmp_path / "r"
    assert main(["pretrain", "--config", RECIPE, "--out", str(run), "--data", f"idx:{fmnist_small}",
                 "--steps", "2", *TINY]) == 0
    assert main(["export", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "enc")]) == 0
    capsys.readouterr()
    for args in (["--ckpt", str(tmp_path / "enc.safetensors")], ["--ckpt", str(run / "last.pt"), "--random-init"],
                 ["--raw-pixels"]):
        assert main(["eval", "knn", "--data", f"idx:{fmnist_small}", *args]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert 10 < result["top1"] <= 100 and result["n_test"] == 1000
    assert main(["eval", "linear", "--data", f"idx:{fmnist_small}", "--ckpt", str(run / "last.pt"),
                 "--epochs", "2"]) == 0
    assert "top1" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_probing_other_data_says_which_normalisation_it_uses(capsys, tmp_path, fmnist_small):
    from mimkit.data.datasets import read_idx
    from mimkit.data.datasets import write_idx
    run = tmp_path / "r"
    assert main(["pretrain", "--config", RECIPE, "--out", str(run), "--data", f"idx:{fmnist_small}",
                 "--steps", "1", *TINY]) == 0
    inverted = tmp_path / "inverted"                                    # the same garments, negated: other stats
    inverted.mkdir()
    for prefix in ("train", "t10k"):
        write_idx(inverted / f"{prefix}-images-idx3-ubyte.gz", 255 - read_idx(fmnist_small / f"{prefix}-images-idx3-ubyte.gz"))
        write_idx(inverted / f"{prefix}-labels-idx1-ubyte.gz", read_idx(fmnist_small / f"{prefix}-labels-idx1-ubyte.gz"))
    capsys.readouterr()
    base = ["eval", "knn", "--ckpt", str(run / "last.pt"), "--data", f"idx:{inverted}", "--train-limit", "300",
            "--test-limit", "100"]
    assert main(base) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["normalisation"]["from"] == "checkpoint" and result["normalisation"]["mean"][0] < 0.5
    assert "with the checkpoint's normalisation" in captured.err and "--normalise data" in captured.err
    assert main(base + ["--normalise", "data"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["normalisation"]["from"] == "data" and result["normalisation"]["mean"][0] > 0.5
    assert "normalisation" not in captured.err
