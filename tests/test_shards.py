"""WebDataset shards: a pack round-trips bit-equal, ranks and workers never share a sample, and a run killed and
resumed on shards reproduces the uninterrupted losses."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mimkit.cli import main
from mimkit.data.datasets import DataError, ImageFolderDataset, build_dataset, read_idx
from mimkit.data.shards import ShardStream, pack_shards, read_back
from tests.conftest import metrics_rows


def image_folder(root, count, size=28, jpeg_every=3, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = (rng.random((size, size)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / (f"{i:04d}.jpg" if i % jpeg_every == 0 else f"{i:04d}.png"))
    return root


def test_a_pack_round_trips_every_image_and_label_bit_equal(tmp_path):
    folder = image_folder(tmp_path / "imgs", 30)
    index = pack_shards(f"folder:{folder}", tmp_path / "shards", shard_bytes=4096)
    assert len(index["shards"]) > 2 and sum(s["count"] for s in index["shards"]) == index["count"] == 30
    source = ImageFolderDataset(folder)
    back = read_back(tmp_path / "shards")
    assert len(back) == 30
    for (key, parts), file, label in zip(back, source.files, source.labels):
        ext = file.suffix.lstrip(".")
        assert parts[ext] == file.read_bytes() and int(parts["cls"]) == label
    assert index["channels"] == 1 and index["mean"] == pytest.approx(source.mean)
    stream = build_dataset(f"shards:{tmp_path / 'shards'}")           # a batch's JPEGs decoded together = PIL's
    batch = stream._decode_batch([(key, parts, 0) for key, parts in back[:12]])
    assert all(torch.equal(x, source[i][0]) for i, x in enumerate(batch))
    assert main(["data", "pack", "--data", f"folder:{folder}", "--out", str(tmp_path / "shards")]) == 2  # not empty
    assert main(["data", "pack", "--data", f"folder:{folder}", "--out", str(tmp_path / "s2"), "--shard-size", "x"]) == 2


def test_shell_globs_select_shards_as_braces_and_folders_do(tmp_path):
    folder = image_folder(tmp_path / "imgs", 40)
    pack_shards(f"folder:{folder}", tmp_path / "shards", max_count=8)             # shard-000000 .. shard-000004
    root = tmp_path / "shards"
    every = build_dataset(f"shards:{root}")
    assert len(every.urls) == 5
    assert build_dataset(f"shards:{root}/*.tar").urls == every.urls               # as users write local shards
    assert build_dataset(f"shards:{root}/shard-00000[0-2].tar").urls == every.urls[:3]
    assert build_dataset(f"shards:{root}/shard-00000?.tar").urls == build_dataset(
        f"shards:{root}/shard-{{000000..000004}}.tar").urls == every.urls
    with pytest.raises(DataError, match="names none of the shards"):
        build_dataset(f"shards:{root}/other-*.tar")


def seeds_seen(stream, rank, world, workers, batch, epoch=0, skip=0):
    """Pack indices one rank reads in an epoch (the transform returns the sample's seed, which encodes its index)."""
    base = (0 * 1_000_003 + epoch) * 10_000_019
    loader = DataLoader(stream.epoch(epoch, 0, rank, world, workers, batch, skip, lambda image, seed: seed),
                        batch_size=batch, num_workers=workers, drop_last=True)
    return [int(s) - base for b in loader for s in b[0]]


def test_two_ranks_with_two_workers_see_each_sample_once_per_epoch(tmp_path):
    folder = image_folder(tmp_path / "imgs", 64, jpeg_every=1000)
    pack_shards(f"folder:{folder}", tmp_path / "shards", max_count=8)             # 8 shards of 8
    stream = build_dataset(f"shards:{tmp_path / 'shards'}")
    assert isinstance(stream, ShardStream) and len(stream) == 64
    seen = [seeds_seen(stream, rank, 2, 2, 4) for rank in (0, 1)]
    assert all(len(s) == 32 for s in seen) and sorted(seen[0] + seen[1]) == list(range(64))
    again = seeds_seen(stream, 0, 2, 2, 4, epoch=1)
    assert sorted(again) == sorted(seen[0]) and again != seen[0]                 # same shards, a new order
    # resuming 3 batches in: the rest of the uninterrupted order, exactly
    assert seeds_seen(stream, 0, 2, 2, 4, skip=3) == seen[0][3 * 4:]
    with pytest.raises(DataError, match="index.json"):
        build_dataset(f"shards:{tmp_path / 'imgs'}")
    with pytest.raises(DataError, match="evaluate on a labelled folder"):
        build_dataset(f"shards:{tmp_path / 'shards'}", "test")


def test_sigkill_then_resume_on_shards_reproduces_the_uninterrupted_losses(fmnist_small, tmp_path):
    from PIL import Image
    images = read_idx(fmnist_small / "train-images-idx3-ubyte.gz")[:1024]
    labels = read_idx(fmnist_small / "train-labels-idx1-ubyte.gz")[:1024]
    for i, (x, y) in enumerate(zip(images, labels)):
        (tmp_path / "imgs" / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(tmp_path / "imgs" / f"c{y}" / f"{i:05d}.png")
    pack_shards(f"folder:{tmp_path / 'imgs'}", tmp_path / "shards", max_count=128)
    args = ["--data", f"shards:{tmp_path / 'shards'}", "--steps", "14", "--ckpt-every", "1", "model.size=pico",
            "method.decoder_dim=32", "method.decoder_depth=1", "data.batch_size=64", "data.num_workers=2",
            "train.log_every=1", "train.sample_every=0", "optim.warmup_epochs=0", "data.shuffle_buffer=50"]
    config = ["--config", "configs/mae_vit-mini_fmnist-tiny.yaml"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-m", "mimkit.cli", "pretrain", "--out", str(full)] + config + args,
                   check=True, capture_output=True, env=env, timeout=600)
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "mimkit.cli", "pretrain", "--out", str(run)] + config + args,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and len(metrics_rows(run) if (run / "metrics.jsonl").exists() else []) < 5:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([sys.executable, "-m", "mimkit.cli", "pretrain", "--out", str(run), "--resume"] + config
                          + args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    expected = {r["step"]: r["loss"] for r in metrics_rows(full)}
    got = {r["step"]: r["loss"] for r in metrics_rows(run)}
    assert sorted(got) == sorted(expected) == list(range(1, 15))       # 8 batches an epoch: the run crosses one
    for step, loss in expected.items():
        assert abs(got[step] - loss) < 1e-5, (step, got[step], loss)


def seed_of(image, seed):
    """A transform that returns the sample's crop seed, which encodes its index in the pack."""
    return seed


def _rank_reads(rank: int, spec: str, port: int, out: str) -> None:
    """One of two gloo ranks: the trainer's own epoch stream, with a transform that returns each sample's seed."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from mimkit.config import load_config
    from mimkit.engine import dist as D
    from mimkit.engine.trainer import Trainer
    cfg = load_config("configs/mae_vit-mini_fmnist-tiny.yaml", [
        f"data.spec={spec}", "model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1",
        "data.batch_size=4", "data.num_workers=2", "train.sample_every=0"])
    trainer = Trainer(cfg, f"{out}/run", quiet=True, device="cpu")
    base = (cfg.train.seed * 1_000_003 + 0) * 10_000_019
    seen = [int(s) - base for batch in trainer._shard_batches(0, 0, seed_of) for s in batch[0]]
    torch.save({"seen": seen, "per_epoch": trainer.steps_per_epoch}, f"{out}/rank{rank}.pt")
    D.shutdown()


def test_a_two_process_run_on_shards_reads_each_sample_once_per_epoch(tmp_path):
    import torch.multiprocessing as mp
    folder = image_folder(tmp_path / "imgs", 64, jpeg_every=1000)
    pack_shards(f"folder:{folder}", tmp_path / "shards", max_count=8)
    mp.spawn(_rank_reads, args=(f"shards:{tmp_path / 'shards'}", 29533, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["per_epoch"] == 8 for r in ranks)                 # 32 samples a rank / batch 4
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(64))
