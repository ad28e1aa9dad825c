"""Evaluation protocols for frozen or fine-tuned encoders."""
from mimkit.eval.features import embed, extract_features
from mimkit.eval.knn import knn_top1
from mimkit.eval.linear import linear_probe_top1

__all__ = ["embed", "extract_features", "knn_top1", "linear_probe_top1"]
