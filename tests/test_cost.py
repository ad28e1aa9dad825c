"""`mimkit bench`: parameters per part add up to the method's, FLOPs are per image (independent of the batch they are
counted on) and count every stage, and the command prints its table."""
import pytest

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.cost import measure, parameter_table
from mimkit.methods import build_method
from tests.conftest import MAE_PICO

VE_PICO = ["model.size=pico", "model.img_size=[28,28]", "model.patch_size=4", "method.name=vision_electra",
           "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def test_parameter_parts_add_up_and_the_encoder_comes_first():
    method = build_method(load_config(None, VE_PICO), 1)
    rows = parameter_table(method)
    assert rows[0][0] == "encoder"
    assert sum(count for _, count, _ in rows) == sum(p.numel() for p in method.parameters())


def test_flops_are_per_image_and_count_every_stage():
    mae = load_config(None, MAE_PICO + ["data.spec=synthetic:1x28x28"])
    one = measure(mae, batch=2, steps=1, warmup=0, modes=(), flop_batch=2)["flops_per_image"]
    two = measure(mae, batch=2, steps=1, warmup=0, modes=(), flop_batch=4)["flops_per_image"]
    assert one == pytest.approx(two, rel=1e-6) and one > 0
    ve = measure(load_config(None, VE_PICO + ["data.spec=synthetic:1x28x28"]), batch=2, steps=1, warmup=0, modes=(),
                 flop_batch=2)["flops_per_image"]
    assert ve > one                    # Vision ELECTRA: MAE's generator step plus a discriminator over every patch


def test_bench_prints_its_table(capsys):
    cfg = "configs/mae_vit-mini_fmnist-tiny.yaml"
    assert main(["bench", "--config", cfg, "--batch", "4", "--steps", "1", "--warmup", "0", "--modes", "eager"]) == 0
    out = capsys.readouterr().out
    assert "| encoder |" in out and "training FLOPs per image" in out and "| eager |" in out
    assert main(["bench", "--config", cfg, "--modes", "fast"]) == 2


PMAE_PICO = MAE_PICO[:3] + ["method.name=perceptual_mae", "method.decoder_dim=32", "method.decoder_depth=1",
                            "method.decoder_heads=2", "method.critic_width=8", "method.critic_depth=2"]


def test_an_alternating_schedule_costs_its_average():
    """LS-GAN-P's perceptual term runs on even epochs only: a step costs the mean of an on- and an off-epoch step,
    not the on-epoch step's cost; StyleGANv2-ADA-P adds R1 on 1 step in 16 and path length on 1 in 4 (on epochs)."""
    from mimkit.engine.cost import flops_per_image
    cfg = load_config(None, PMAE_PICO + ["method.loss=lsgan-p"])
    method = build_method(cfg, 1)
    on, off = (flops_per_image(cfg, 1, step=5, epoch=e, method=method) for e in (1, 0))
    assert on > off > 0
    assert flops_per_image(cfg, 1, method=method) == pytest.approx((on + off) / 2, rel=1e-9)
    cfg = load_config(None, PMAE_PICO + ["method.loss=stylegan2-ada-p", "method.msg_mae=false", "method.scales=2", "method.decoder_depth=2",
                                         "method.ada=false"])
    method = build_method(cfg, 1)
    count = lambda step, epoch: flops_per_image(cfg, 1, step=step, epoch=epoch, method=method)   # noqa: E731
    both, pl_only, none, r1_off_epoch, plain_off_epoch = count(0, 1), count(4, 1), count(1, 1), count(0, 0), count(1, 0)
    assert both > pl_only > none and r1_off_epoch > plain_off_epoch
    expected = 0.5 * (both + 3 * pl_only + 12 * none) / 16 + 0.5 * (r1_off_epoch + 15 * plain_off_epoch) / 16
    assert flops_per_image(cfg, 1, method=method) == pytest.approx(expected, rel=1e-9)
