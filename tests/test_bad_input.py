"""Bad input: one sentence naming the fix and exit code 2, never a traceback and never a silent wrong run;
and the crash cases that must not make a run un-resumable."""
import errno
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data import build_dataset
from mimkit.engine.checkpoint import load_checkpoint
from tests.conftest import REPO
from tests.test_cli import TINY, error_of

RECIPE = str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml")


def pretrain(tmp_path, fmnist_small, *extra, out="r"):
    return ["pretrain", "--config", RECIPE, "--out", str(tmp_path / out), "--data", f"idx:{fmnist_small}", *TINY, *extra]


def test_yaml_syntax_error_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: mae\nmodel: {size: pico}\n")
    err = error_of(capsys, ["pretrain", "--config", str(bad), "--out", str(tmp_path / "r")])
    assert str(bad) in err and "line 2" in err and "not valid YAML" in err


def test_yaml_that_is_not_a_mapping(capsys, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- mae\n- simmim\n")
    assert "not a mapping" in error_of(capsys, ["pretrain", "--config", str(bad), "--out", str(tmp_path / "r")])


@pytest.mark.parametrize("override,key", [
    ("data.batch_size=0", "data.batch_size"), ("data.batch_size=-4", "data.batch_size"),
    ("model.img_size=0", "model.img_size"), ("model.patch_size=0", "model.patch_size"),
    ("model.patch_size=5", "model.patch_size"), ("train.log_every=0", "train.log_every"),
    ("method.mask_ratio=0.0", "method.mask_ratio"), ("method.mask_ratio=1.5", "method.mask_ratio"),
    ("method.mask_ratio=1.0", "method.mask_ratio"), ("optim.base_lr=-1", "optim.base_lr"),
])
def test_out_of_range_values(capsys, tmp_path, fmnist_small, override, key):
    err = error_of(capsys, pretrain(tmp_path, fmnist_small, override))
    assert f"{key}=" in err and "out of range" in err


@pytest.mark.parametrize("flag,value,key", [("--ckpt-every", "0", "train.ckpt_every"), ("--steps", "0", "train.steps"),
                                            ("--steps", "-1", "train.steps")])
def test_out_of_range_flags(capsys, tmp_path, fmnist_small, flag, value, key):
    err = error_of(capsys, pretrain(tmp_path, fmnist_small, flag, value))
    assert f"argument {flag}: {value} is out of range: it must be at least 1" in err   # the flag typed ({key})
    assert not (tmp_path / "r").exists()


def test_cuda_without_a_gpu(capsys, tmp_path, fmnist_small, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = error_of(capsys, pretrain(tmp_path, fmnist_small, "--device", "cuda", "--steps", "1"))
    assert "no CUDA GPU" in err and "--device cpu" in err


def write_png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)


def test_folder_mixing_gray_rgb_and_rgba_converts_to_the_majority(capsys, tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        write_png(data / f"rgb{i}.png", rng.integers(0, 255, (28, 28, 3), dtype=np.uint8))
    write_png(data / "gray.png", np.full((28, 28), 200, dtype=np.uint8))
    write_png(data / "rgba.png", rng.integers(0, 255, (28, 28, 4), dtype=np.uint8))
    dataset = build_dataset(f"folder:{data}")
    notes = capsys.readouterr().err
    assert dataset.channels == 3 and notes.count("converting every image to 3 channels") == 1, notes
    gray = dataset[dataset.files.index(data / "gray.png")][0]
    assert gray.shape == (3, 28, 28) and bool((gray == 200).all())
    assert build_dataset(f"folder:{data}", channels=1)[0][0].shape == (1, 28, 28)      # data.channels=1
    run = tmp_path / "run"
    assert main(["pretrain", "--config", RECIPE, "--out", str(run), "--data", f"folder:{data}", "--steps", "2",
                 "data.batch_size=4", *TINY[:3], "data.num_workers=0", "train.sample_every=0"]) == 0
    assert load_checkpoint(run / "last.pt")["in_chans"] == 3


def test_16_bit_pngs_keep_their_range(tmp_path):
    data = tmp_path / "deep"
    data.mkdir()
    values = np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16)
    for i in range(3):
        Image.fromarray(values).save(data / f"{i}.png")          # saved as a 16-bit grayscale PNG
    image = build_dataset(f"folder:{data}")[0][0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert torch.allclose(image[0], torch.from_numpy(values.astype(np.float32) / 65535), atol=1e-6)
    assert (image >= 0.999).float().mean() < 0.01                 # not saturated (was 99.6 % at 255)


def test_nonfinite_npy_names_the_file(capsys, tmp_path, fmnist_small):
    data = tmp_path / "arrays"
    data.mkdir()
    for i in range(8):
        np.save(data / f"{i}.npy", np.random.default_rng(i).normal(size=(2, 28, 28)).astype(np.float32))
    broken = np.random.default_rng(9).normal(size=(2, 28, 28)).astype(np.float32)
    broken[1, 3, 3] = np.nan
    np.save(data / "7.npy", broken)
    err = error_of(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "r"), "--data", f"folder:{data}",
                            "--steps", "4", "data.batch_size=4", *TINY[:3], "data.num_workers=0"])
    assert "7.npy holds NaN or infinite values" in err


def test_nonfinite_npy_in_a_worker_is_still_one_sentence(capsys, tmp_path):
    data = tmp_path / "arrays"
    data.mkdir()
    for i in range(8):
        np.save(data / f"{i}.npy", np.zeros((1, 28, 28), np.float32) if i != 5 else np.full((1, 28, 28), np.inf, np.float32))
    err = error_of(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "r"), "--data", f"folder:{data}",
                            "--steps", "4", "data.batch_size=4", *TINY[:3], "data.num_workers=1"])
    assert "5.npy holds NaN or infinite values" in err


def test_full_disk_leaves_no_partial_file(capsys, tmp_path, fmnist_small, monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    err = error_of(capsys, pretrain(tmp_path, fmnist_small, "--steps", "1"))
    assert "No space left on device" in err and "free disk space" in err
    assert not list((tmp_path / "r").glob("*.pt*")) and not list((tmp_path / "r").glob(".*tmp*"))


def test_read_only_out(capsys, tmp_path, fmnist_small, monkeypatch):
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    err = error_of(capsys, pretrain(tmp_path, fmnist_small, "--steps", "1", out="ro"))
    assert "Read-only file system" in err and str(tmp_path / "ro") in err


def test_out_pointing_at_a_file(capsys, tmp_path, fmnist_small):
    (tmp_path / "r").write_text("not a directory")
    assert "is a file" in error_of(capsys, pretrain(tmp_path, fmnist_small, "--steps", "1"))


def test_resume_where_no_run_is_says_it_starts_fresh(capsys, tmp_path, fmnist_small):
    assert main(pretrain(tmp_path, fmnist_small, "--steps", "1", "--resume")) == 0
    assert "holds no run yet (no last.pt); starting fresh" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "r/last.pt")["step"] == 1


def test_truncated_last_pt_falls_back_to_the_newest_readable_checkpoint(capsys, tmp_path, fmnist_small):
    assert main(pretrain(tmp_path, fmnist_small, "train.keep_every=2", "--steps", "6")) == 0
    run = tmp_path / "r"
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])                   # power loss mid-copy
    (run / "checkpoint-0000006.pt").write_bytes(b"")                         # and the newest keep is empty too
    capsys.readouterr()
    assert main(pretrain(tmp_path, fmnist_small, "train.keep_every=2", "--steps", "6", "--resume")) == 0
    out = capsys.readouterr().out
    assert "last.pt can't be read" in out and "resuming from checkpoint-0000004.pt (step 4)" in out, out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(run / "last.pt")["step"] == 6


def test_torn_metrics_line_does_not_block_resume(tmp_path, fmnist_small):
    assert main(pretrain(tmp_path, fmnist_small, "--steps", "4", "--ckpt-every", "2")) == 0
    run = tmp_path / "r"
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 5, "lo')   # power loss
    assert main(pretrain(tmp_path, fmnist_small, "--steps", "6", "--resume")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
