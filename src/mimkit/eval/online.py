"""The online probe: k-NN (and a quick linear probe) top-1 of the encoder being pre-trained, on a fixed labelled
subset, every `train.probe_every` steps, so representation quality is visible while a run goes (metrics.jsonl and
TensorBoard: `probe/knn_top1`, `probe/linear_top1`, `probe/seconds`). `rankme` needs no labels: RankMe and the
feature spread (eval/rankme.py) of the `train.probe_test` images (`probe/rankme`, `probe/feature_spread`), with a
one-line warning when the features collapse: alone, on the run's held-out images (`data.val_split` / `--val-data`)
where there are, else on the probe data's test split, else on a fixed subset of its images.

The subsets are drawn once with their own seeds (`train.probe_train` train images, `train.probe_test` test images of
`train.probe_data`, else the training data's spec); features are the encoder's pooled output on the resized, not
augmented, images (as `mimkit eval knn`). The probe runs on the main process only, in eval mode, inside a forked
RNG, so it changes neither the training (a resumed run with or without it gives the same losses) nor the encoder.
"""
from __future__ import annotations

import time

import torch

from mimkit.data.datasets import DataError, build_dataset
from mimkit.eval.features import extract_features, labels_of, subset
from mimkit.eval.knn import knn_top1
from mimkit.eval.linear import linear_probe_top1
from mimkit.eval.rankme import collapse_warning, feature_spread, rankme


class OnlineProbe:
    LINEAR_EPOCHS, LINEAR_BATCH = 100, 256   # a quick probe: ~800 SGD steps on cached features, seconds on a CPU
    warning: str | None = None                # rankme's collapse warning of the last probe

    def __init__(self, cfg, in_chans: int, mean: list[float], std: list[float], device: torch.device,
                 held_out=None):
        t = cfg.train
        spec = t.probe_data or cfg.data.spec
        self.kinds = [k.strip() for k in t.online_probe.split(",")]
        self.labelled = bool({"knn", "linear"} & set(self.kinds))
        self.img_size, self.pool, self.mean, self.std, self.device = cfg.model.img_size, cfg.model.pool, mean, std, device
        if not self.labelled and held_out is not None and not t.probe_data:   # rankme alone: the held-out images
            self.train, self.test = None, held_out
            return
        train = build_dataset(spec, "train", cfg.data.channels)
        try:
            test = build_dataset(spec, "test", cfg.data.channels)
        except DataError:
            if self.labelled:
                raise
            test = train          # rankme alone on a folder without a test split: a fixed subset of its images
        for name, dataset in (("train", train), ("test", test)):
            if not self.labelled:
                if getattr(dataset, "channels", in_chans) != in_chans:
                    raise DataError(f"the probe data ({spec}) has {dataset.channels}-channel images, the model takes "
                                    f"{in_chans}; set train.probe_data to data of the same kind or data.channels")
                continue
            if getattr(dataset, "channels", in_chans) != in_chans:
                raise DataError(f"the probe data ({spec}) has {dataset.channels}-channel images, the model takes "
                                f"{in_chans}; set train.probe_data to data of the same kind or data.channels")
            labels = labels_of(dataset) if getattr(dataset, "labels", None) is not None else torch.empty(0)
            if len(labels) == 0 or int(labels.min()) < 0:
                raise DataError(f"train.online_probe needs labelled images, and the {name} split of {spec} has none; "
                                f"set train.probe_data to a labelled spec (class sub-folders) or train.online_probe=null")
        self.train, self.test = subset(train, t.probe_train, seed=0), subset(test, t.probe_test, seed=1)
        if self.labelled:
            self.train_labels, self.test_labels = labels_of(self.train), labels_of(self.test)

    def describe(self) -> str:
        if not self.labelled:
            return f"online probe: rankme on {len(self.test)} images, no labels"
        return f"online probe: {' + '.join(self.kinds)} on {len(self.train)} train / {len(self.test)} test images"

    def __call__(self, encoder: torch.nn.Module) -> dict[str, float]:
        """Top-1 (%) of each probe kind; the encoder's train/eval mode is restored."""
        start, was_training = time.perf_counter(), encoder.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            feats = [extract_features(encoder, data, self.img_size, self.mean, self.std, self.pool, device=self.device)[0]
                     if self.labelled or data is self.test else None for data in (self.train, self.test)]
            row = {}
            if "rankme" in self.kinds:
                row["probe/rankme"] = rankme(feats[1])
                row["probe/feature_spread"] = feature_spread(feats[1])
                self.warning = collapse_warning(feats[1])
            if "knn" in self.kinds:
                row["probe/knn_top1"] = knn_top1(feats[0], self.train_labels, feats[1], self.test_labels)
            if "linear" in self.kinds:
                row["probe/linear_top1"] = linear_probe_top1(feats[0], self.train_labels, feats[1], self.test_labels,
                                                             epochs=self.LINEAR_EPOCHS, batch_size=self.LINEAR_BATCH)
        encoder.train(was_training)
        row["probe/seconds"] = time.perf_counter() - start
        return row
