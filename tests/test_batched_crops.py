"""Batched RandomResizedCrop on the device: the same boxes as the per-image path, the same pixels where torchvision
resizes without antialiasing (enlarged crops, bilinear), a stated difference where it shrinks; the trainer uses it on
CUDA (or when asked) and a run gives the same losses as the per-image path to rounding. Batched JPEG decoding in the
workers gives PIL's pixels."""
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from mimkit.config import ConfigError, load_config
from mimkit.data.batched import BatchedCrops, pad_collate, resized_crops
from mimkit.data.transforms import PretrainTransform
from mimkit.engine.trainer import Trainer
from tests.conftest import MAE_PICO, metrics_rows


def smooth_image(h=75, w=100, c=3, seed=0):
    torch.manual_seed(seed)
    return (F.interpolate(torch.rand(1, c, h // 5, w // 5), size=(h, w), mode="bilinear")[0] * 255).round().to(torch.uint8)


def photo_folder(root, count, png_at=(), seed=0, grid=(6, 8), scale=10, gray=False):
    """Two class sub-folders of smooth RGB (or gray) JPEGs; the indices in `png_at` saved as PNG."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(count):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        arr = np.kron(rng.random(grid + ((1,) if gray else (3,))), np.ones((scale, scale, 1)))
        arr = (arr[..., 0] if gray else arr) * 255
        Image.fromarray(arr.astype(np.uint8)).save(root / f"c{i % 2}" / (f"{i}.png" if i in png_at else f"{i}.jpg"),
                                                  quality=90)
    return root


def per_image_float(image, transform, seed, mode):
    """The per-image path's crop, computed in float (no rounding to uint8)."""
    top, left, h, w, flip = transform.draw(image.shape[-2], image.shape[-1], seed)
    interp = InterpolationMode.BILINEAR if mode == "bilinear" else InterpolationMode.BICUBIC
    out = TF.resized_crop(image.float() / 255, top, left, h, w, transform.size, interpolation=interp, antialias=True)
    return TF.horizontal_flip(out) if flip else out


def batched(images, transform, seeds, mode):
    data = BatchedCrops([(x, 0, 0) for x in images], transform)
    pixels, labels, skipped, params = pad_collate([data[(i, s)] for i, s in enumerate(seeds)])
    return resized_crops(pixels.float() / 255, params, transform.size, mode)


def test_enlarged_bilinear_crops_equal_the_per_image_path_and_use_its_boxes():
    image = smooth_image()
    transform = PretrainTransform((96, 96), scale=(0.05, 0.3), interpolation="bilinear")   # every crop enlarged
    seeds = list(range(100, 132))
    out = batched([image] * 32, transform, seeds, "bilinear")
    ref = torch.stack([per_image_float(image, transform, s, "bilinear") for s in seeds])
    assert torch.allclose(out, ref, atol=1e-5)
    uint8_path = torch.stack([transform(image, s) for s in seeds]).float() / 255    # what training used so far
    assert (out - uint8_path).abs().max() <= 1 / 255 + 1e-6                        # its rounding to 8 bits only
    flips = [transform.draw(75, 100, s)[4] for s in seeds]
    assert 0 < sum(flips) < 32


def test_shrunk_and_bicubic_crops_are_close_to_the_per_image_path():
    """Stated tolerances: shrinking, s x s supersampling stands in for torchvision's antialias filter; bicubic,
    grid_sample's kernel (a = -0.75) differs from torchvision's antialiased one (a = -0.5)."""
    image = smooth_image(300, 400)
    for mode, scale in (("bilinear", (0.2, 1.0)), ("bicubic", (0.05, 0.3)), ("bicubic", (0.2, 1.0))):
        transform = PretrainTransform((112, 112), scale=scale, interpolation=mode)
        seeds = list(range(16))
        diff = (batched([image] * 16, transform, seeds, mode)
                - torch.stack([per_image_float(image, transform, s, mode) for s in seeds])).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.08, (mode, scale, diff.mean(), diff.max())


def test_images_of_different_sizes_crop_as_if_alone():
    small, large = smooth_image(40, 30, seed=1), smooth_image(90, 120, seed=2)
    transform = PretrainTransform((32, 32), scale=(0.3, 1.0), interpolation="bilinear")
    together = batched([small, large], transform, [5, 6], "bilinear")
    assert torch.allclose(together[0], batched([small], transform, [5], "bilinear")[0], atol=1e-6)
    assert torch.allclose(together[1], batched([large], transform, [6], "bilinear")[0], atol=1e-6)


def small_run(fmnist_small, extra=()):
    return load_config(None, MAE_PICO + [f"data.spec=idx:{fmnist_small}", "data.batch_size=256", "data.num_workers=0",
                                         "optim.warmup_epochs=0", "train.log_every=1", "train.ckpt_every=1000",
                                         "train.sample_every=0", "train.steps=3", "data.interpolation=bilinear"]
                       + list(extra))


def test_trainer_crops_on_the_device_when_asked_and_matches_the_worker_path(fmnist_small, tmp_path):
    trainer = Trainer(small_run(fmnist_small, ["data.augment_on=device"]), tmp_path / "device", quiet=True)
    batch = next(trainer._micro_batches(0))
    assert len(batch) == 4 and batch[3].shape == (256, 5)              # box regions + params: the batched path
    trainer.train()
    auto = Trainer(small_run(fmnist_small), tmp_path / "worker", quiet=True)     # auto on a CPU: the workers crop
    assert len(next(auto._micro_batches(0))) == 3
    auto.train()
    device = [r["loss"] for r in metrics_rows(tmp_path / "device")]
    worker = [r["loss"] for r in metrics_rows(tmp_path / "worker")]
    assert device == pytest.approx(worker, rel=2e-3)                   # the same crops up to 8-bit rounding


def test_crop_settings_are_checked():
    with pytest.raises(ConfigError, match="data.interpolation='nearest' is out of range"):
        load_config(None, MAE_PICO + ["data.interpolation=nearest"])
    with pytest.raises(ConfigError, match="data.augment_on='gpu' is out of range: it must be auto, device or worker"):
        load_config(None, MAE_PICO + ["data.augment_on=gpu"])


def test_a_worker_batch_decodes_its_jpegs_together_like_pil_and_skips_bad_files(tmp_path):
    from mimkit.data.datasets import ImageFolderDataset
    photo_folder(tmp_path, 6, png_at=(3,))
    (tmp_path / "c1" / "9_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    dataset = ImageFolderDataset(tmp_path)
    transform = PretrainTransform((32, 32), scale=(0.3, 1.0))
    crops = BatchedCrops(dataset, transform)
    items = [(i, 100 + i) for i in range(len(dataset))]
    with pytest.warns(UserWarning, match="9_broken.jpg"):
        together = crops.__getitems__(items)
        alone = [crops[item] for item in items]
    assert len(together) == len(dataset) == 7
    for a, b in zip(together, alone):
        assert torch.equal(a[0], b[0]) and a[1:3] == b[1:3] and torch.equal(a[3], b[3])
    broken = [str(f) for f in dataset.files].index(str(tmp_path / "c1" / "9_broken.jpg"))
    assert together[broken][2] == 1 and sum(t[2] for t in together) == 1     # skipped, a neighbour given, counted
    decoded = dataset.decode_jpegs(list(range(len(dataset))))
    assert decoded[broken] is None and decoded[[f.suffix for f in dataset.files].index(".png")] is None


def test_decoding_on_the_device_gives_the_workers_crops(tmp_path):
    from mimkit.data.batched import EncodedCrops, decode_on_device, encoded_collate
    from mimkit.data.datasets import ImageFolderDataset
    photo_folder(tmp_path, 12, png_at=(5,), seed=1, grid=(7, 9), scale=8)
    dataset = ImageFolderDataset(tmp_path)
    transform = PretrainTransform((40, 40), scale=(0.3, 1.0), interpolation="bilinear")
    items = [(i, 50 + i) for i in range(len(dataset))]
    encoded = encoded_collate(EncodedCrops(dataset, transform).__getitems__(items))
    assert sum(x.ndim == 1 for x in encoded[0]) == 11                        # the PNG came decoded
    pixels, params, bad = decode_on_device(encoded[0], encoded[3], 3, "cpu")
    reference = pad_collate(BatchedCrops(dataset, transform).__getitems__(items))
    assert bad == 0 and torch.equal(params, reference[3])
    got = resized_crops(pixels.float() / 255, params, (40, 40), "bilinear")
    assert torch.equal(got, resized_crops(reference[0].float() / 255, reference[3], (40, 40), "bilinear"))
    broken = list(encoded[0])
    broken[2] = broken[2][:200]                                              # a header, then nothing
    _, params2, bad = decode_on_device(broken, encoded[3], 3, "cpu")
    assert bad == 1 and params2[2, 4] == 0


def test_trainer_decodes_jpegs_on_the_device_when_asked(tmp_path):
    photo_folder(tmp_path / "imgs", 64, seed=2, grid=(28, 28), scale=1, gray=True)
    base = MAE_PICO + [f"data.spec=folder:{tmp_path / 'imgs'}", "data.batch_size=16", "data.num_workers=0",
                       "optim.warmup_epochs=0", "train.log_every=1", "train.ckpt_every=1000", "train.sample_every=0",
                       "train.steps=3", "data.augment_on=device"]
    trainer = Trainer(load_config(None, base + ["data.decode_on=device"]), tmp_path / "dev", quiet=True)
    assert isinstance(next(trainer._micro_batches(0))[0], list)
    trainer.train()
    Trainer(load_config(None, base + ["data.decode_on=worker"]), tmp_path / "wrk", quiet=True).train()
    assert [r["loss"] for r in metrics_rows(tmp_path / "dev")] == [r["loss"] for r in metrics_rows(tmp_path / "wrk")]
    with pytest.raises(ConfigError, match="data.decode_on='device' is out of range"):
        load_config(None, MAE_PICO + ["data.decode_on=device", "data.augment_on=worker"])
