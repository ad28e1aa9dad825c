"""Instance data in COCO's format: `--data coco:DIR` reads two layouts, and `mimkit data make-detection` builds a
benchmark in the second from Fashion-MNIST.

- COCO's release: `train2017/`, `val2017/` and `annotations/instances_{train,val}2017.json`.
- Any COCO-format folder: `train/`, `val/` and `annotations/instances_{train,val}.json` (what make-detection writes).

Annotations are read with pycocotools (polygons, RLE and uncompressed RLE masks alike). Category ids (COCO's run
1..90 with gaps) become contiguous labels 1..K for the detector (0 is its background) and are mapped back for
scoring. What is skipped, as COCO's and torchvision's reference tools skip it, and counted (one warning per split):
crowd regions in training (`iscrowd: 1`; the scorer ignores detections on them), boxes of zero width or height,
polygons of fewer than three points (an annotation left without one is skipped), and training images left without
an annotation. What stops the run with one sentence (exit 2): an annotation for an image id the file does not list,
an unknown category id, a box more than one pixel outside its image (within a pixel it is clipped), an image file
that is missing.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mimkit.data.datasets import DataError, ImageFolderDataset, _match_channels
from mimkit.data.segmentation import canvas_splits, new_benchmark_folder

SPLITS = ("train", "val")


def quiet_coco(annotation_file: Path | None = None, dataset: dict | None = None):
    """pycocotools' COCO index without its prints (stdout carries the CLI's JSON line)."""
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        try:
            coco.dataset = dataset if dataset is not None else json.loads(Path(annotation_file).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{annotation_file} is not a readable COCO annotation file ({err}); write it as COCO's "
                            f"JSON (images, annotations, categories)") from None
        if not all(isinstance(coco.dataset.get(k), list) for k in ("images", "annotations", "categories")):
            raise DataError(f"{annotation_file} is not a COCO annotation file: it needs the lists 'images', "
                            f"'annotations' and 'categories'")
        coco.createIndex()
    return coco


def coco_files(root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split in either layout."""
    for images, annotation_file in ((root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
                                (root / split, root / "annotations" / f"instances_{split}.json")):
        if annotation_file.is_file():
            if not images.is_dir():
                raise DataError(f"{annotation_file} is there but its images are not: put them in {images}/")
            return images, annotation_file
    raise DataError(f"{root} holds no COCO annotations for '{split}' (annotations/instances_{split}2017.json with "
                    f"{split}2017/, or annotations/instances_{split}.json with {split}/); build a benchmark with "
                    f"'mimkit data make-detection --out DIR'")


class CocoDetection(Dataset):
    """(image [C, H, W] uint8, target) of one split; target holds `boxes` [N, 4] (x1, y1, x2, y2 in pixels, float),
    `labels` [N] (1..K), `masks` [N, H, W] uint8 and `image_id`. `coco` is the split's pycocotools index (the
    scorer's ground truth, crowd regions included), `classes` the category names in label order."""

    def __init__(self, root: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"detection splits are train and val, not '{split}'")
        self.root, self.split = Path(root), split
        self.folder, self.annotation_file = coco_files(self.root, split)
        self.coco = quiet_coco(self.annotation_file)
        categories = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.classes = [c.get("name", str(c["id"])) for c in categories]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.skipped: dict[str, int] = {}
        self.annotations = self._checked_annotations()
        ids = sorted(self.coco.imgs)
        if split == "train":
            kept = [i for i in ids if self.annotations.get(i)]
            if len(kept) < len(ids):
                self._skip("images without an annotation", len(ids) - len(kept))
            ids = kept
        if not ids:
            raise DataError(f"{self.annotation_file} lists no {'annotated ' if split == 'train' else ''}images")
        self.image_ids = ids
        lost = [self.coco.imgs[i]["file_name"] for i in ids if not (self.folder / self.coco.imgs[i]["file_name"]).is_file()]
        if lost:
            raise DataError(f"{len(lost)} image(s) listed in {self.annotation_file.name} are not in {self.folder} "
                            f"(e.g. {lost[0]}); add them or remove their entries")
        if self.skipped:
            warnings.warn(f"{self.annotation_file.name}: skipped " + ", ".join(f"{n} {what}" for what, n in
                                                                                self.skipped.items()), stacklevel=2)
        sample = [self.image(i) for i in range(0, len(ids), max(1, len(ids) // 32))[:32]]
        self.channels = max({x.shape[0] for x in sample}, key=lambda c: sum(x.shape[0] == c for x in sample))
        self.mean, self.std = ImageFolderDataset._estimate_stats([x for x in sample if x.shape[0] == self.channels])

    def _skip(self, what: str, n: int = 1) -> None:
        self.skipped[what] = self.skipped.get(what, 0) + n

    def _checked_annotations(self) -> dict[int, list[dict]]:
        """image id -> its usable annotations (boxes clipped, degenerate polygons dropped); bad ones named."""
        name = self.annotation_file.name
        kept: dict[int, list[dict]] = {}
        for ann in self.coco.dataset["annotations"]:
            image = self.coco.imgs.get(ann.get("image_id"))
            if image is None:
                raise DataError(f"{name}: annotation {ann.get('id')} is for image id {ann.get('image_id')}, which the "
                                f"file's 'images' does not list; add the image or remove the annotation")
            if ann.get("category_id") not in self.label_of:
                raise DataError(f"{name}: annotation {ann.get('id')} has category id {ann.get('category_id')}, not "
                                f"one of the file's categories {self.category_ids[:10]}; fix the id or add the category")
            if ann.get("iscrowd", 0):
                if self.split == "train":
                    self._skip("crowd regions")
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            width, height = image["width"], image["height"]
            if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
                raise DataError(f"{name}: annotation {ann['id']}'s box [{x:g}, {y:g}, {w:g}, {h:g}] (x, y, width, "
                                f"height) lies outside its image {image['file_name']} ({width}x{height}); fix the box")
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, width), min(y + h, height)
            if x2 <= x1 or y2 <= y1:
                self._skip("boxes of zero size")
                continue
            segmentation = ann.get("segmentation")
            if isinstance(segmentation, list):
                polygons = [p for p in segmentation if len(p) >= 6]
                if len(polygons) < len(segmentation):
                    self._skip("polygons of fewer than 3 points", len(segmentation) - len(polygons))
                if not polygons:
                    self._skip("annotations left without a polygon")
                    continue
                ann = {**ann, "segmentation": polygons}
            elif not isinstance(segmentation, dict):
                self._skip("annotations without a mask")
                continue
            kept.setdefault(image["id"], []).append({**ann, "box": [x1, y1, x2, y2]})
        return kept

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image(self, index: int) -> torch.Tensor:
        return ImageFolderDataset.load(self.folder / self.coco.imgs[self.image_ids[index]]["file_name"])

    def target(self, index: int) -> dict:
        image_id = self.image_ids[index]
        info, anns = self.coco.imgs[image_id], self.annotations.get(image_id, [])
        masks = np.zeros((len(anns), info["height"], info["width"]), np.uint8)
        for k, ann in enumerate(anns):
            masks[k] = self.coco.annToMask(ann)
        return {"boxes": torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                "masks": torch.from_numpy(masks), "image_id": image_id}

    def __getitem__(self, index: int):
        image, target = self.image(index), self.target(index)
        if image.shape[-2:] != target["masks"].shape[-2:]:
            info = self.coco.imgs[self.image_ids[index]]
            raise DataError(f"{info['file_name']} is {image.shape[-1]}x{image.shape[-2]} but {self.annotation_file.name} "
                            f"says {info['width']}x{info['height']}; fix the file's width and height")
        if image.shape[0] != self.channels:
            image = _match_channels(image, self.channels, self.folder / self.coco.imgs[self.image_ids[index]]["file_name"])
        return image, target


def detection_split(spec: str, split: str) -> CocoDetection:
    """`coco:DIR` -> that folder's split."""
    kind, sep, path = spec.partition(":")
    if kind != "coco" or not path:
        raise DataError(f"detection data is given as coco:DIR (COCO's release layout or any COCO-format folder), "
                        f"not '{spec}'")
    return CocoDetection(Path(path).expanduser(), split)


def encode_mask(mask: np.ndarray) -> dict:
    """A binary mask as COCO's compressed RLE, JSON-ready."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_box(mask: np.ndarray) -> list[float]:
    """COCO's [x, y, width, height] of a mask's pixels (pixel edges: a one-pixel mask is 1 x 1)."""
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)]


def make_detection(out: str | Path, source: str = "fashion-mnist", canvas: int = 64, train_count: int = 2000,
                   val_count: int = 500, items: tuple[int, int] = (1, 4), scale: tuple[float, float] = (0.75, 1.5),
                   seed: int = 0) -> dict:
    """The canvases of `make-segmentation` (the same generator, so the same seed draws the same canvases), written
    as a COCO-format folder: one instance per visible item, its mask the item's visible foreground pixels (RLE),
    its box that mask's extent, its category the garment class (ids 1..10); items covered whole are left out."""
    from PIL import Image
    out = new_benchmark_folder(out)
    (out / "annotations").mkdir(parents=True)
    summary = {"canvas": canvas, "seed": seed, "items": list(items), "scale": list(scale)}
    for split, names, canvases in canvas_splits(source, canvas, train_count, val_count, items, scale, seed):
        (out / split).mkdir()
        images, annotations = [], []
        for n, (image, placed) in enumerate(canvases):
            file_name = f"{n:06d}.png"
            Image.fromarray(image).save(out / split / file_name)
            images.append({"id": n + 1, "file_name": file_name, "height": canvas, "width": canvas})
            for cls, mask in placed:
                if mask.any():
                    annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": cls + 1,
                                        "bbox": mask_box(mask), "area": float(mask.sum()), "iscrowd": 0,
                                        "segmentation": encode_mask(mask)})
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"info": {"description": "mimkit make-detection", **summary}, "images": images,
             "annotations": annotations, "categories": categories}))
        summary[split] = len(images)
        summary[f"{split}_instances"] = len(annotations)
    return summary
