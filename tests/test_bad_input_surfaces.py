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


def damaged_pack(tmp_path, count=40, per_shard=10):
    """`count` random 16x16 PNGs in 2 classes packed into shards of `per_shard`; returns the pack folder."""
    import numpy as np
    from PIL import Image

    from mimkit.data.shards import pack_shards
    rng = np.random.default_rng(0)
    for i in range(count):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i:03d}.png")
    pack_shards(f"folder:{tmp_path / 'imgs'}", tmp_path / "shards", max_count=per_shard)
    return tmp_path / "shards"


def members(shard):
    """(name, header offset, data offset) of each member of a tar shard."""
    import tarfile
    with tarfile.open(shard) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar]


SHARD_RUN = ["--steps", "3", "model.size=pico", "model.img_size=16", "model.patch_size=4", "method.decoder_dim=32",
             "method.decoder_depth=1", "data.batch_size=4", "data.num_workers=0", "train.sample_every=0",
             "train.log_every=1", "optim.warmup_epochs=0"]


@pytest.mark.parametrize("cut", ["inside a member", "at a member boundary"])
def test_a_truncated_shard_is_named_with_its_missing_samples(capsys, tmp_path, cut):
    pack = damaged_pack(tmp_path)
    shard = pack / "shard-000001.tar"
    layout = members(shard)                       # .cls, .png per sample: member 7 is the 4th sample's image
    data = shard.read_bytes()
    shard.write_bytes(data[:layout[7][2] + 100] if cut == "inside a member" else data[:layout[8][1]])
    lost = 7 if cut == "inside a member" else 6   # a sample whose image is whole but whose label is cut still counts
    run = ["pretrain", "--config", RECIPE, "--data", f"shards:{pack}"] + SHARD_RUN
    err = error_of(capsys, run + ["--out", str(tmp_path / "stopped")])       # 7 of 40 missing > data.max_missing=1%
    assert f"{lost} of the 40 samples index.json lists are missing" in err and \
        f"shard-000001.tar (truncated: {lost} of its 10 samples missing)" in err and "data.max_missing" in err
    assert not (tmp_path / "stopped" / "last.pt").exists()
    assert main(run + ["--out", str(tmp_path / "goes-on"), "data.max_missing=0.2"]) == 0   # the stated rule: below it
    said = capsys.readouterr().out
    assert said.count("shard-000001.tar (truncated") == 1 and "training without them" in said
    index = json.loads((pack / "index.json").read_text())                   # a pack written before sizes were listed
    for entry in index["shards"]:
        entry.pop("bytes")
    (pack / "index.json").write_text(json.dumps(index))
    err = error_of(capsys, run + ["--out", str(tmp_path / "old-index")])
    assert f"shard-000001.tar (truncated: {lost} of its 10 samples missing)" in err


def test_a_shard_cut_while_it_is_streamed_stops_the_run_naming_it(tmp_path):
    from mimkit.data.datasets import DataError, build_dataset
    pack = damaged_pack(tmp_path)
    stream = build_dataset(f"shards:{pack}")                              # whole when opened
    shard = pack / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:members(shard)[9][2] + 50])    # then cut: 5 samples left
    batches = stream.epoch(0, 0, 0, 1, 1, 4, 0, lambda image, seed: image)
    with pytest.raises(DataError, match=r"shard-000002.tar ended after 4 of the 10 samples index.json lists "
                                        r"\(unexpected end of data\).*--resume"):
        list(batches)


def test_an_undecodable_shard_member_is_skipped_and_counted(capsys, tmp_path, recwarn):
    import io
    import tarfile
    pack = damaged_pack(tmp_path)
    shard = pack / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        parts = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:                                 # 000000003.png's bytes are not an image
        for member, data in parts:
            data = b"\x89PNG broken" if member.name == "000000003.png" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    index = json.loads((pack / "index.json").read_text())
    index["shards"][0]["bytes"] = shard.stat().st_size
    (pack / "index.json").write_text(json.dumps(index))
    run = tmp_path / "r"
    assert main(["pretrain", "--config", RECIPE, "--data", f"shards:{pack}", "--out", str(run), "--steps", "10"]
                + SHARD_RUN[2:]) == 0                                    # one epoch: every sample read once
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] == 1
    said = [str(w.message) for w in recwarn if "could not be decoded" in str(w.message)]
    assert said and all(w == f"skipping 000000003.png in {shard}: it could not be decoded (UnidentifiedImageError: "
                             f"000000003.png is not in an image format PIL reads)" for w in said)
