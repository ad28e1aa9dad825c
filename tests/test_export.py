import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import mimkit
from mimkit.config import load_config
from mimkit.engine.trainer import Trainer, load_init
from mimkit.export import export_encoder
from mimkit.methods import CheckpointMismatch, build_method
from tests.conftest import MAE_PICO, tiny_config


@pytest.fixture(scope="module")
def mae_run(fmnist_small, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "mae"
    Trainer(tiny_config(fmnist_small, "mae", ["train.steps=3"]), run).train()
    return run


def test_export_loads_strictly_in_timm_and_matches_run_features(mae_run, tmp_path):
    weights, meta_path = export_encoder(mae_run / "last.pt", tmp_path / "enc")
    meta = json.loads(meta_path.read_text())
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    from_run = mimkit.load_encoder(mae_run / "last.pt")
    from_export = mimkit.load_encoder(weights)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = from_run.forward_features(x)
        assert torch.allclose(model.forward_features(x), ref, atol=1e-5)
        assert torch.allclose(from_export.forward_features(x), ref, atol=1e-5)
    assert meta["pool"] == "cls" and meta["method"] == "mae" and len(meta["mean"]) == 1


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_an_exports_model_x_is_what_the_probes_embedded(fmnist_small, tmp_path, pool):
    """timm.create_model(**json)(x) returns the pooled features `mimkit eval knn/linear` probe (Issue 15, item 4), and
    the files have the usual permissions."""
    import os
    import stat

    from mimkit.eval.features import embed
    run = tmp_path / "run"
    Trainer(tiny_config(fmnist_small, "mae", ["train.steps=1", f"model.pool={pool}"]), run).train()
    weights, meta_path = export_encoder(run / "last.pt", tmp_path / "enc")
    meta = json.loads(meta_path.read_text())
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        probed = embed(mimkit.load_encoder(run / "last.pt"), x, pool)
        assert torch.allclose(model.eval()(x), probed, atol=1e-5)
    umask = os.umask(0)
    os.umask(umask)
    for path in (weights, meta_path, run / "last.pt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def official_mae_state_dict(with_decoder: bool, in_chans: int = 1) -> dict:
    """A state dict with the official MAE release's key names (encoder = timm ViT keys, decoder keys)."""
    torch.manual_seed(7)
    reference = build_method(load_config(None, MAE_PICO), in_chans)
    sd = {}
    for key, value in reference.state_dict().items():
        name = key.replace("generator.encoder.model.", "").replace("generator.", "")
        if with_decoder or not name.startswith(("decoder", "mask_token")):
            sd[name] = torch.randn_like(value)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"} <= set(sd)
    if with_decoder:
        assert {"mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.mlp.fc1.weight",
                "decoder_norm.weight", "decoder_pred.weight"} <= set(sd)
    return sd


@pytest.mark.parametrize("with_decoder", [True, False])
def test_official_mae_checkpoint_initialises_the_model(tmp_path, fmnist_small, with_decoder):
    sd = official_mae_state_dict(with_decoder)
    torch.save({"model": sd}, tmp_path / "mae_official.pth")
    cfg = tiny_config(fmnist_small, "mae", ["train.steps=1"])
    trainer = Trainer(cfg, tmp_path / "run", init=str(tmp_path / "mae_official.pth"))
    gen = trainer.method.generator
    assert torch.equal(gen.encoder.model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    if with_decoder:
        assert torch.equal(gen.decoder_pred.weight, sd["decoder_pred.weight"])
        assert torch.equal(gen.mask_token, sd["mask_token"])
    # the encoder computes what a timm ViT holding the saved weights computes
    kwargs = trainer.method.encoder.timm_kwargs
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    reference.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(gen.encoder.model.eval().forward_features(x), reference.forward_features(x), atol=1e-5)


def test_checkpoint_with_other_channel_count_is_one_clear_error(tmp_path):
    torch.save({"model": official_mae_state_dict(True, in_chans=3)}, tmp_path / "rgb.pth")
    method = build_method(load_config(None, MAE_PICO), 1)
    with pytest.raises(CheckpointMismatch, match="3-channel images but this model takes 1 channels"):
        load_init(method, tmp_path / "rgb.pth")
