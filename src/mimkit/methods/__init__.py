"""Methods: one file per paper, composed from backbones, masking, targets and losses."""
from mimkit.methods.base import CheckpointMismatch, Method, Stage
from mimkit.methods.mae import MAE
from mimkit.methods.simmim import SimMIM

METHODS: dict[str, type[Method]] = {"mae": MAE, "simmim": SimMIM}

__all__ = ["METHODS", "Method", "Stage", "CheckpointMismatch", "MAE", "SimMIM", "build_method"]


def build_method(cfg, in_chans: int) -> Method:
    return METHODS[cfg.method.get("name", "mae")](cfg, in_chans)
