"""mimkit: masked image modeling pre-training with one engine for every method."""
__version__ = "0.1.0"


def load_encoder(path):
    """The pre-trained encoder as a plain timm model, from a run checkpoint (RUN/last.pt) or an export."""
    from mimkit.export import load_encoder as _load
    return _load(path)


__all__ = ["load_encoder", "__version__"]
