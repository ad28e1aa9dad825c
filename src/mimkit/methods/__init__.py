"""Methods: one file per paper, composed from backbones, masking, targets and losses."""
from mimkit.methods.base import CheckpointMismatch, Method, Stage
from mimkit.methods.cae import CAE
from mimkit.methods.cim import CIM
from mimkit.methods.dvae import DVAETraining
from mimkit.methods.gan_mae import GANMAE
from mimkit.methods.mae import MAE
from mimkit.methods.perceptual_mae import PerceptualMAE
from mimkit.methods.simmim import SimMIM
from mimkit.methods.vision_electra import VisionElectra
from mimkit.methods.vqvae import VQVAETraining

METHODS: dict[str, type[Method]] = {"mae": MAE, "simmim": SimMIM, "vision_electra": VisionElectra, "gan_mae": GANMAE,
                                    "cae": CAE, "cim": CIM, "perceptual_mae": PerceptualMAE, "dvae": DVAETraining,
                                    "vqvae": VQVAETraining}
TOKENIZER_METHODS = ("dvae", "vqvae")

__all__ = ["METHODS", "TOKENIZER_METHODS", "Method", "Stage", "CheckpointMismatch", "MAE", "SimMIM", "VisionElectra",
           "GANMAE", "CAE", "CIM", "PerceptualMAE", "build_method", "build_for_encoder"]


def build_method(cfg, in_chans: int) -> Method:
    return METHODS[cfg.method.get("name", "mae")](cfg, in_chans)


def build_for_encoder(cfg, in_chans: int) -> Method:
    """The method with the same encoder but no frozen parts (`Method.encoder_only_options`): what probing or
    fine-tuning weights with `--config` builds, so a recipe's tokenizer file need not exist."""
    from mimkit.config import config_from_dict
    name = cfg.method.get("name", "mae")
    data = cfg.to_dict()
    data["method"] = {"name": name, **METHODS[name].encoder_only_options({k: v for k, v in cfg.method.items()
                                                                          if k != "name"})}
    return METHODS[name](config_from_dict(data), in_chans)
