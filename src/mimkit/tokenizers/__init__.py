"""Discrete image tokenizers (DALL-E's dVAE, a VQ-VAE) behind one interface (`base.Tokenizer`), and the one way to
load them: `load_tokenizer(path)` for a tokenizer run (RUN or RUN/last.pt), a `.safetensors` tokenizer file
(`save_tokenizer`, `mimkit tokenizer convert-dalle`); pickles are never read here."""
from __future__ import annotations

import json
from pathlib import Path

from mimkit.tokenizers.base import Tokenizer
from mimkit.tokenizers.dvae import DiscreteVAE
from mimkit.tokenizers.vq import VQTokenizer

KINDS: dict[str, type[Tokenizer]] = {"dvae": DiscreteVAE, "vq": VQTokenizer}
FILE_FORMAT = "mimkit-tokenizer"

__all__ = ["Tokenizer", "DiscreteVAE", "VQTokenizer", "load_tokenizer", "save_tokenizer", "KINDS"]


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Writes the tokenizer's weights and architecture to one `.safetensors` file."""
    from mimkit.engine.checkpoint import save_safetensors
    path = Path(path)
    save_safetensors(tokenizer.state_dict(), path, metadata={"format": FILE_FORMAT, "kind": tokenizer.kind,
                                                             "arch": json.dumps(tokenizer.arch)})
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A frozen tokenizer (eval mode, no gradient) from a tokenizer run or a tokenizer `.safetensors` file."""
    from mimkit.engine.checkpoint import CheckpointError, is_run_checkpoint, load_checkpoint
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"tokenizer file {path} does not exist; train one with 'mimkit tokenizer train' or "
                              f"convert DALL-E's with 'mimkit tokenizer convert-dalle', and point tokenizer.path at it")
    if path.suffix == ".pkl":
        raise CheckpointError(f"{path} is a pickle, which mimkit does not load (it could run code); convert it once "
                              f"with 'mimkit tokenizer convert-dalle --encoder ... --decoder ... --out T.safetensors "
                              f"--trust-pickle' and use T.safetensors")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as err:   # safetensors raises its own SafetensorError for a file it cannot parse
            raise CheckpointError(f"{path} is not a readable .safetensors file ({str(err).splitlines()[0]}); it may be "
                                  f"truncated or another format: convert DALL-E's with 'mimkit tokenizer convert-dalle' "
                                  f"or point tokenizer.path at a tokenizer run") from None
        if meta.get("format") != FILE_FORMAT or meta.get("kind") not in KINDS:
            raise CheckpointError(f"{path} is not a mimkit tokenizer file (no tokenizer metadata); write one with "
                                  f"'mimkit tokenizer convert-dalle' or from a tokenizer run")
        tokenizer = KINDS[meta["kind"]](**json.loads(meta["arch"]))
        try:
            tokenizer.load_state_dict(load_file(str(path)))
        except Exception as err:   # a header that parses over a truncated body
            raise CheckpointError(f"{path} holds a tokenizer header but its weights cannot be read "
                                  f"({str(err).splitlines()[0]}); the file is truncated or damaged: write it again") from None
    else:
        from mimkit.export import method_from_checkpoint
        from mimkit.methods import TOKENIZER_METHODS
        obj = load_checkpoint(path)
        if not is_run_checkpoint(obj) or obj["config"]["method"].get("name") not in TOKENIZER_METHODS:
            raise CheckpointError(f"{path} is not a tokenizer run (method {', '.join(TOKENIZER_METHODS)}); train one "
                                  f"with 'mimkit tokenizer train'")
        tokenizer = method_from_checkpoint(obj)[0].tokenizer
    tokenizer.requires_grad_(False)
    return tokenizer.eval()
