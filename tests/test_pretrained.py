"""Every init path with checkpoints written in the *official* key layouts: every loaded tensor equals the
file's, each module reports its count, and a module left wholly at its init is one clear error."""
import pytest
import torch

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.checkpoint import load_checkpoint
from mimkit.engine.trainer import Trainer, load_init
from mimkit.methods import CheckpointMismatch, build_method
from tests.conftest import MAE_PICO, REPO, SIMMIM_PICO, tiny_config
from tests.test_export import official_mae_state_dict

VE_RECIPE = str(REPO / "configs/vision-electra_vit-mini_fmnist-tiny.yaml")
VE_PICO = ["model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def official_simmim_vit_state_dict(layer_scale: bool = True, in_chans: int = 1) -> dict:
    """SimMIM's ViT release layout: `encoder.*` (BEiT-style blocks with q/v biases and gamma_1/2, a learnt
    absolute position table, `encoder.mask_token`) and `decoder.0.*`; random values everywhere."""
    torch.manual_seed(3)
    reference = build_method(load_config(None, SIMMIM_PICO + [f"method.layer_scale={0.1 if layer_scale else None}"]),
                             in_chans)
    sd = {}
    for key, value in reference.state_dict().items():
        if key.startswith("backbone.model."):
            name = "encoder." + key[len("backbone.model."):]
            if name.endswith("attn.qkv.bias"):
                d = value.shape[0] // 3
                sd[name.replace("qkv.bias", "q_bias")], sd[name.replace("qkv.bias", "v_bias")] = torch.randn(d), torch.randn(d)
                continue
            sd[name.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = torch.randn_like(value)
        elif key == "backbone.mask_token":
            sd["encoder.mask_token"] = torch.randn(1, 1, value.shape[-1])
        else:
            sd[key] = torch.randn_like(value)
    if layer_scale:
        assert "encoder.blocks.0.gamma_1" in sd and "encoder.blocks.0.attn.q_bias" in sd
    return sd


def assert_vit_equals_mae_file(vit, sd: dict) -> None:
    """Every tensor of a timm ViT equals the official MAE file's (bare timm keys)."""
    own = vit.state_dict()
    assert set(own) <= set(sd), set(own) - set(sd)
    for key, value in own.items():
        assert torch.equal(value, sd[key]), key


def assert_vit_equals_simmim_file(vit, sd: dict) -> None:
    """Every tensor of a timm ViT equals the SimMIM file's (q/v biases -> qkv bias with a zero k bias)."""
    for key, value in vit.state_dict().items():
        if key.endswith("attn.qkv.bias"):
            q, v = sd[f"encoder.{key.replace('qkv.bias', 'q_bias')}"], sd[f"encoder.{key.replace('qkv.bias', 'v_bias')}"]
            assert torch.equal(value, torch.cat([q, torch.zeros_like(q), v])), key
        else:
            name = "encoder." + key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
            assert torch.equal(value, sd[name]), key


def test_mae_init_from_official_layout_loads_every_tensor(tmp_path):
    sd = official_mae_state_dict(True)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    method = build_method(load_config(None, MAE_PICO), 1)
    report = load_init(method, tmp_path / "mae.pth")
    n = len(method.encoder.state_dict())
    assert f"encoder: {n}/{n} tensors loaded" in report and "decoder: 20/20 tensors loaded" in report, report
    assert_vit_equals_mae_file(method.encoder.model, sd)
    gen = method.generator
    for key in ("mask_token", "decoder_embed.weight", "decoder_pred.weight", "decoder_blocks.0.attn.qkv.weight"):
        assert torch.equal(gen.state_dict()[key], sd[key]), key
    # the file's table is not MAE's sin-cos one, so it is a learnt table and stays trainable
    assert method.encoder.model.pos_embed.requires_grad


def test_encoder_only_release_reports_the_decoder_left_at_init(tmp_path):
    sd = official_mae_state_dict(False)
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    method = build_method(load_config(None, MAE_PICO), 1)
    report = load_init(method, tmp_path / "mae_pretrain.pth")
    n = len(method.encoder.state_dict())
    assert f"encoder: {n}/{n}" in report and "decoder: 0/20 tensors loaded, left at init: mask_token" in report, report
    assert_vit_equals_mae_file(method.encoder.model, sd)


def test_file_without_the_encoder_is_one_clear_error(tmp_path):
    decoder_only = {k: v for k, v in official_mae_state_dict(True).items() if k.startswith(("decoder", "mask_token"))}
    torch.save({"model": decoder_only}, tmp_path / "decoder.pth")
    with pytest.raises(CheckpointMismatch, match="holds no weights for the encoder"):
        load_init(build_method(load_config(None, MAE_PICO), 1), tmp_path / "decoder.pth")


def test_layer_scale_weights_never_vanish(tmp_path):
    torch.save({"model": official_simmim_vit_state_dict(layer_scale=True)}, tmp_path / "simmim.pth")
    with pytest.raises(CheckpointMismatch, match="uses layer scale"):
        load_init(build_method(load_config(None, MAE_PICO), 1), tmp_path / "simmim.pth")


def test_simmim_init_from_official_vit_layout(tmp_path):
    sd = official_simmim_vit_state_dict(layer_scale=True)
    torch.save({"model": sd}, tmp_path / "simmim.pth")
    method = build_method(load_config(None, SIMMIM_PICO), 1)
    report = load_init(method, tmp_path / "simmim.pth")
    assert "encoder: 63/63 tensors loaded" in report, report
    assert_vit_equals_simmim_file(method.backbone.model, sd)
    assert torch.equal(method.backbone.mask_token, sd["encoder.mask_token"])
    assert torch.equal(method.decoder[0].weight, sd["decoder.0.weight"])


def test_vision_electra_generator_and_discriminator_from_official_layouts(tmp_path, fmnist_small):
    mae_sd, sim_sd = official_mae_state_dict(True), official_simmim_vit_state_dict(layer_scale=True)
    torch.save({"model": mae_sd}, tmp_path / "mae.pth")
    torch.save({"model": sim_sd}, tmp_path / "simmim.pth")
    cfg = tiny_config(fmnist_small, "mae", ["method.name=vision_electra", *VE_PICO[1:], "train.steps=2",
                                            f"method.generator_init={tmp_path / 'mae.pth'}",
                                            f"method.discriminator_init={tmp_path / 'simmim.pth'}"])
    trainer = Trainer(cfg, tmp_path / "ve")
    ve = trainer.method
    assert_vit_equals_mae_file(ve.generator.encoder.model, mae_sd)          # G's encoder: was left random
    assert torch.equal(ve.generator.decoder_pred.weight, mae_sd["decoder_pred.weight"])
    assert_vit_equals_simmim_file(ve.encoder.model, sim_sd)                 # D: gammas were dropped
    assert ve.opts.discriminator_layer_scale == 0.1 and cfg.method["discriminator_layer_scale"] == 0.1
    assert ve.encoder.model.pos_embed.requires_grad                         # SimMIM's table is learnt
    assert any(p is ve.encoder.model.pos_embed for _, p in ve.optim_groups()["discriminator"])
    # a resumed run needs neither file: the weights and the resolved layer scale are in the run
    trainer.train(stop_after=1)
    (tmp_path / "mae.pth").unlink()
    (tmp_path / "simmim.pth").unlink()
    Trainer(cfg, tmp_path / "ve", resume=True).train()
    assert load_checkpoint(tmp_path / "ve/last.pt")["step"] == 2


def test_vision_electra_generator_init_needs_a_generator(tmp_path):
    sd = official_mae_state_dict(False)                      # no decoder: G would be half random
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    ve = build_method(load_config(None, ["method.name=vision_electra", *VE_PICO, "model.img_size=[28,28]",
                                         "model.patch_size=4", f"method.generator_init={tmp_path / 'mae_pretrain.pth'}"]), 1)
    with pytest.raises(CheckpointMismatch, match="no weights for the generator decoder"):
        ve.load_initial_weights()


def test_vision_electra_continues_from_a_mimkit_simmim_run(tmp_path, fmnist_small):
    Trainer(tiny_config(fmnist_small, "simmim", ["train.steps=1"]), tmp_path / "simmim").train()
    sim_state = load_checkpoint(tmp_path / "simmim/last.pt")["model"]
    cfg = tiny_config(fmnist_small, "mae", ["method.name=vision_electra", *VE_PICO[1:], "train.steps=1",
                                            f"method.discriminator_init={tmp_path / 'simmim/last.pt'}"])
    ve = Trainer(cfg, tmp_path / "ve").method
    own = ve.encoder.model.state_dict()
    theirs = {k[len("backbone.model."):]: v for k, v in sim_state.items() if k.startswith("backbone.model.")}
    assert set(own) == set(theirs)                           # layer-scale gammas included, none dropped
    for key, value in own.items():
        assert torch.equal(value, theirs[key]), key


def test_cli_prints_per_module_counts(tmp_path, fmnist_small, capsys):
    """The acceptance command, at pico size: G from an official MAE file, D from an official SimMIM file."""
    torch.save({"model": official_mae_state_dict(True)}, tmp_path / "A.pth")
    torch.save({"model": official_simmim_vit_state_dict(layer_scale=True)}, tmp_path / "B.pth")
    code = main(["pretrain", "--config", VE_RECIPE, "--out", str(tmp_path / "run"), "--data", f"idx:{fmnist_small}",
                 "--steps", "1", *VE_PICO, "data.num_workers=0", "data.batch_size=16", "train.sample_every=0",
                 f"method.generator_init={tmp_path / 'A.pth'}", f"method.discriminator_init={tmp_path / 'B.pth'}"])
    out = capsys.readouterr().out
    assert code == 0
    ve = load_checkpoint(tmp_path / "run/last.pt")["model"]
    g = sum(k.startswith("generator.encoder.") for k in ve)
    d = sum(k.startswith("discriminator.backbone.") for k in ve)
    assert f"generator encoder: {g}/{g} tensors loaded" in out and "generator decoder: 20/20 tensors loaded" in out, out
    assert f"discriminator encoder: {d}/{d} tensors loaded" in out and "discriminator heads: fresh" in out, out


def test_init_from_a_timm_export(tmp_path, fmnist_small):
    from mimkit.export import export_encoder
    Trainer(tiny_config(fmnist_small, "mae", ["train.steps=1"]), tmp_path / "run").train()
    weights, _ = export_encoder(tmp_path / "run/last.pt", tmp_path / "enc")
    from safetensors.torch import load_file
    exported = load_file(str(weights))
    method = build_method(load_config(None, MAE_PICO), 1)
    report = load_init(method, weights)
    assert "decoder: 0/20" in report
    for key, value in method.encoder.model.state_dict().items():
        assert torch.equal(value, exported[key]), key


@pytest.mark.parametrize("share", [True, False])
def test_gan_mae_continues_from_the_official_mae_layout(tmp_path, share):
    sd = official_mae_state_dict(True)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    overrides = [o.replace("method.name=mae", "method.name=gan_mae") for o in MAE_PICO]
    method = build_method(load_config(None, overrides + [f"method.share_weights={share}"]), 1)
    report = load_init(method, tmp_path / "mae.pth")
    n = len(method.encoder.state_dict())
    assert f"encoder: {n}/{n} tensors loaded" in report and "decoder: 20/20 tensors loaded" in report, report
    assert_vit_equals_mae_file(method.generator.encoder.model, sd)
    assert_vit_equals_mae_file(method.discriminator.backbone.model, sd)     # shared, or filled from the same file
    assert torch.equal(method.generator.decoder_pred.weight, sd["decoder_pred.weight"])
    assert ("discriminator encoder" in report) == (not share)
