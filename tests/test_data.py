import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import (DataError, IDXDataset, ImageFolderDataset, PretrainTransform, ResumableSampler,
                         build_dataset)
from mimkit.data.datasets import write_idx


def test_idx_reader_roundtrip(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (10, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(10) % 3)
    ds = build_dataset(f"idx:{tmp_path}")
    assert isinstance(ds, IDXDataset) and len(ds) == 10 and ds.channels == 1 and ds.num_classes == 3
    image, label, skipped = ds[4]
    assert image.dtype == torch.uint8 and torch.equal(image[0], torch.from_numpy(images[4])) and label == 1


def test_missing_dataset_is_one_clear_sentence(tmp_path):
    with pytest.raises(DataError, match="does not exist.*apt-get install -y dataset-fashion-mnist"):
        build_dataset(f"idx:{tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="unknown data spec"):
        build_dataset("imagenet")


def test_image_folder_classes_and_flat(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / "lab" / cls / f"{i}.png")
    labelled = ImageFolderDataset(tmp_path / "lab")
    assert labelled.classes == ["cat", "dog"] and labelled.channels == 3 and labelled[4][1] == 1
    assert labelled[0][0].shape == (3, 20, 30)
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")
    flat = ImageFolderDataset(tmp_path / "flat")
    assert flat.channels == 1 and flat[0][1] == -1


def test_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")


def test_corrupt_image_is_skipped_with_warning_and_flagged(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"not a png at all")
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(UserWarning, match="could not be decoded"):
        image, _, skipped = ds[1]
    assert skipped == 1 and image.float().mean() == 100  # the neighbour, 2.png
    assert ds[0][2] == 0


def test_many_channel_npy_arrays(tmp_path):
    for i in range(2):
        np.save(tmp_path / f"{i}.npy", np.random.default_rng(i).normal(size=(6, 16, 24)).astype(np.float32))
    ds = ImageFolderDataset(tmp_path)
    assert ds.channels == 6 and len(ds.mean) == 6 and ds[0][0].shape == (6, 16, 24)


def test_pretrain_transform_is_seeded_per_sample():
    image = torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8)
    t = PretrainTransform([28, 28], scale=(0.2, 1.0))
    assert torch.equal(t(image, 123), t(image, 123))
    assert any(not torch.equal(t(image, 1), t(image, s)) for s in range(2, 6))
    assert t(image, 5).shape == (1, 28, 28)


def test_sampler_resumes_mid_epoch_and_shards_by_rank():
    full = list(ResumableSampler(100, seed=3, epoch=2))
    assert list(ResumableSampler(100, seed=3, epoch=2, skip=40)) == full[40:]
    ranks = [list(ResumableSampler(100, seed=3, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert not set(i for i, _ in ranks[0]) & set(i for i, _ in ranks[1])
    assert [i for i, _ in full] != [i for i, _ in ResumableSampler(100, seed=3, epoch=3)]
