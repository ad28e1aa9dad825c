"""OpenAI's released DALL-E dVAE (`encoder.pkl`, `decoder.pkl`: whole pickled modules of the `dall_e` package)
mapped onto mimkit's `DiscreteVAE` and written as a `.safetensors` tokenizer file. Unpickling runs code from the
file, so it happens only here, only with `--trust-pickle`, and needs the `dall_e` package importable."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from mimkit.engine.checkpoint import CheckpointError
from mimkit.tokenizers import save_tokenizer
from mimkit.tokenizers.dvae import DiscreteVAE


def dalle_to_mimkit(state: dict) -> dict:
    """`blocks.X.w` / `blocks.X.b` -> `X.weight` / `X.bias` (module names are otherwise the same)."""
    out = {}
    for key, value in state.items():
        name = key[len("blocks."):] if key.startswith("blocks.") else key
        if name.endswith(".w"):
            name = name[:-2] + ".weight"
        elif name.endswith(".b"):
            name = name[:-2] + ".bias"
        out[name] = value.float()
    return out


def load_dalle_pickles(encoder_pkl: str | Path, decoder_pkl: str | Path, trust_pickle: bool) -> DiscreteVAE:
    if not trust_pickle:
        raise CheckpointError(f"{encoder_pkl} and {decoder_pkl} are pickles, which can run code when loaded; pass "
                              f"--trust-pickle if you trust their source (e.g. OpenAI's DALL-E release)")
    for path in (encoder_pkl, decoder_pkl):
        if not Path(path).is_file():
            raise CheckpointError(f"{path} does not exist; download DALL-E's encoder.pkl and decoder.pkl first")
    try:
        importlib.import_module("dall_e")         # the pickles reference its classes
    except ImportError:
        raise CheckpointError("reading DALL-E's pickles needs the dall-e package: pip install dall-e") from None
    encoder = torch.load(encoder_pkl, map_location="cpu", weights_only=False)
    decoder = torch.load(decoder_pkl, map_location="cpu", weights_only=False)
    groups = encoder.group_count
    tokenizer = DiscreteVAE(in_chans=encoder.input_channels, vocab_size=encoder.vocab_size, n_hid=encoder.n_hid,
                            n_init=decoder.n_init, groups=groups, blocks_per_group=encoder.n_blk_per_group,
                            img_size=None)
    if decoder.n_hid != encoder.n_hid or decoder.output_channels != encoder.input_channels:
        raise CheckpointError(f"{encoder_pkl} and {decoder_pkl} do not belong together (widths or channels differ)")
    tokenizer.encoder.load_state_dict(dalle_to_mimkit(encoder.state_dict()))
    tokenizer.decoder.load_state_dict(dalle_to_mimkit(decoder.state_dict()))
    return tokenizer


def convert_dalle(encoder_pkl, decoder_pkl, out, trust_pickle: bool = False) -> Path:
    return save_tokenizer(load_dalle_pickles(encoder_pkl, decoder_pkl, trust_pickle), out)
