"""Bad input on the surfaces added since the hardening (issue 24, in part): tokenizer files that are not ones, a shard
index of another shape, `data pack --out` a file, `--resume` with nothing to resume, and every numeric option of
every sub-command: one sentence, exit 2, no traceback."""
import json

import pytest

from mimkit.cli import main
from tests.conftest import REPO
from tests.test_cli import error_of

RECIPE = str(REPO / "configs/cae-pixels_vit-mini_fmnist-tiny.yaml")


def test_a_tokenizer_file_that_is_not_one(capsys, tmp_path, tiny_tokenizer):
    text = tmp_path / "tok.safetensors"
    text.write_text("not a tokenizer at all\n" * 10)
    cae = ["pretrain", "--config", str(REPO / "configs/cae_vit-mini_fmnist-tiny.yaml"), "--out", str(tmp_path / "r")]
    err = error_of(capsys, cae + [f"tokenizer.path={text}"])
    assert "is not a readable .safetensors file" in err and "convert-dalle" in err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_tokenizer.read_bytes()[:-200])                   # an interrupted copy
    err = error_of(capsys, cae + [f"tokenizer.path={cut}"])
    assert "truncated" in err


def test_a_shard_index_of_another_shape(capsys, tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": "a.tar", "n": 3}], "channels": 1}))
    err = error_of(capsys, ["pretrain", "--config", RECIPE, "--out", str(tmp_path / "r"), "--data", f"shards:{tmp_path}"])
    assert "is not a mimkit shard index" in err and "mimkit data pack" in err


def test_data_pack_onto_a_file_and_resume_with_nothing_to_resume(capsys, tmp_path):
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "taken").write_text("x")
    err = error_of(capsys, ["data", "pack", "--data", f"folder:{tmp_path / 'imgs'}", "--out", str(tmp_path / "taken")])
    assert "is a file; give a folder" in err and "Errno" not in err
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, ["pretrain", "--out", str(tmp_path / "empty"), "--resume"])
    assert "holds no run to resume" in err and "--config" in err


@pytest.mark.parametrize("argv, sentence", [
    (["eval", "attentive", "--raw-pixels", "--epochs", "0"], "argument --epochs: 0 is out of range: it must be at least 1"),
    (["eval", "knn", "--raw-pixels", "--k", "0"], "argument --k: 0 is out of range"),
    (["eval", "linear", "--raw-pixels", "--train-limit", "0"], "argument --train-limit: 0 is out of range"),
    (["eval", "linear", "--raw-pixels", "--lr", "-1"], "argument --lr: -1.0 is out of range: it must be positive"),
    (["eval", "knn", "--raw-pixels", "--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    (["eval", "recon", "--ckpt", "r", "--num-images", "0"], "argument --num-images: 0 is out of range"),
    (["eval", "robustness", "--ckpt", "r", "--severities", "0,6"], "must list severities from 1 to 5"),
    (["eval", "report", "r", "--test-limit", "-5"], "argument --test-limit: -5 is out of range"),
    (["tokenizer", "show", "--tokenizer", "t", "--out", "o.png", "--ratio", "1.5"], "in (0, 1]"),
    (["visualize", "attention", "--ckpt", "r", "--out", "a.png", "--num-images", "0"], "--num-images: 0 is out of range"),
    (["bench", "--config", "c.yaml", "--warmup", "-1"], "argument --warmup: -1 is out of range: it must be at least 0"),
    (["demo", "--train-limit", "0"], "argument --train-limit: 0 is out of range"),
])
def test_numeric_options_are_range_checked_when_parsed(capsys, argv, sentence):
    err = error_of(capsys, argv)
    assert sentence in err, err


class FillsUp:
    """A file that takes `room` bytes, then fails the way a full disk does: an OSError on the write that does not fit
    (`short=False`), or a short write that reports fewer bytes than asked (`short=True`, which PyTorch's zip writer
    turns into `RuntimeError: ... unexpected pos`)."""

    def __init__(self, real, room: int, short: bool):
        self.real, self.room, self.short = real, room, short

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) <= self.room:
            self.room -= len(data)
            return self.real.write(data)
        if not self.short:
            import errno
            raise OSError(errno.ENOSPC, "No space left on device")
        fitted, self.room = data[:self.room], 0
        return self.real.write(fitted)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()
        return False


@pytest.mark.parametrize("short", [False, True])
def test_a_disk_that_fills_during_a_checkpoint(capsys, tmp_path, fmnist_small, monkeypatch, short):
    """The first checkpoint is written; the disk then fills during the next one: one sentence, exit 2, the previous
    checkpoint intact and no partial file left."""
    import builtins

    from mimkit.engine import checkpoint
    from mimkit.engine.checkpoint import load_checkpoint
    run = tmp_path / "r"
    argv = ["pretrain", "--config", str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml"), "--out", str(run), "--data",
            f"idx:{fmnist_small}", "model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1",
            "data.batch_size=8", "data.num_workers=0", "train.sample_every=0", "train.log_every=1", "train.ckpt_every=2"]
    assert main(argv + ["--steps", "2"]) == 0
    size = (run / "last.pt").stat().st_size
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r", *a, **k: FillsUp(builtins.open(path, mode, *a, **k),
                                                                                   size // 3, short), raising=False)
    err = error_of(capsys, argv + ["--steps", "4", "--resume"])
    assert "could not write" in err and "free disk space" in err and "previous checkpoint" in err
    assert load_checkpoint(run / "last.pt")["step"] == 2
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_a_real_small_filesystem_fills_during_the_first_checkpoint(capsys, tmp_path, fmnist_small):
    """On a 256 KiB tmpfs (root only; skipped where no mount is allowed) the first checkpoint does not fit."""
    import os
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("no tmpfs mount allowed here")
    try:
        err = error_of(capsys, ["pretrain", "--config", str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml"), "--out",
                                str(small / "r"), "--data", f"idx:{fmnist_small}", "--steps", "1", "data.batch_size=8",
                                "data.num_workers=0", "train.sample_every=0"])
        assert "could not write" in err and "free disk space" in err
        assert not [p for p in (small / "r").iterdir() if p.suffix == ".pt" or ".tmp" in p.name]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
