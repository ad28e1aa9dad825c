"""Data: datasets, seeded transforms and a resumable sampler."""
from mimkit.data.datasets import DataError, IDXDataset, ImageFolderDataset, build_dataset, resolve_spec
from mimkit.data.sampler import ResumableSampler
from mimkit.data.transforms import Augmented, EvalTransform, PretrainTransform, to_unit_float

__all__ = ["DataError", "IDXDataset", "ImageFolderDataset", "build_dataset", "resolve_spec", "ResumableSampler",
           "Augmented", "EvalTransform", "PretrainTransform", "to_unit_float"]
