"""Schedules that follow a compressed run: `train.steps` shortens the recipe, and every epoch-based decision (the
epoch a method sees, Perceptual MAE's even-epoch rule) keeps its share of it, as the warm-up and milestones do; a
declared stage or loss term that no step reaches is named in one warning."""
import warnings

from mimkit.cli import main
from mimkit.engine.trainer import Trainer
from tests.conftest import REPO, metrics_rows, tiny_config

LSGAN_P = str(REPO / "configs/perceptual-mae-lsgan-p_vit-mini_fmnist-tiny.yaml")


def test_the_schedule_epoch_is_the_steps_share_of_the_recipe(fmnist_small, tmp_path):
    trainer = Trainer(tiny_config(fmnist_small, "mae", ["train.epochs=5", "train.steps=10"]), tmp_path / "r")
    assert trainer.steps_per_epoch == 64                                         # 2,048 images at batch 32
    assert [trainer.schedule_epoch(s) for s in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    full = Trainer(tiny_config(fmnist_small, "mae", ["train.epochs=2"]), tmp_path / "f")   # uncompressed: data epochs
    assert [full.schedule_epoch(s) for s in (0, 63, 64, 127)] == [0, 0, 1, 1]


def test_a_short_lsgan_p_run_applies_its_perceptual_term_on_even_epochs(fmnist_small, tmp_path, recwarn):
    """The shipped recipe (10 epochs, the term on even epochs counted from 1) squeezed into 8 steps: the term runs in
    the steps that fall in epochs 2, 4, 6, 8 and 10 of the recipe, and nowhere else; no warning."""
    run = tmp_path / "r"
    assert main(["pretrain", "--config", LSGAN_P, "--out", str(run), "--data", f"idx:{fmnist_small}", "--steps", "8",
                 "data.batch_size=32", "data.num_workers=0", "train.log_every=1", "train.sample_every=0"]) == 0
    rows = metrics_rows(run)
    on = ["generator/loss_style" in row for row in rows]
    # recipe epoch of step s: s * 640 // 8 // 64 -> 0 1 2 3 5 6 7 8; even epochs counted from 1 = odd 0-based ones
    assert on == [False, True, False, True, True, False, True, False], on
    assert not [w for w in recwarn if "never run" in str(w.message)]


def test_a_run_that_never_reaches_a_term_says_so_once(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", ["method.name=perceptual_mae", "method.loss=lsgan-p", "method.critic_width=8",
                                            "method.critic_depth=2", "train.epochs=2", "train.steps=1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, tmp_path / "r").train()
    said = [str(w.message) for w in caught if "never run" in str(w.message)]
    assert len(said) == 1 and "the lsgan-p term (even epochs)" in said[0] and "lengthen the run" in said[0], said


def test_a_recipe_states_its_papers_lr_at_its_batch_and_a_run_says_what_it_uses(fmnist_small, tmp_path, capsys):
    """Perceptual MAE Sec. 4: lr 1.5e-4 at a batch of 16, as written (the old recipes read 16 per GPU and scaled
    1.5e-4 per 256: 9.4e-6 on one GPU). CAE and CIM: 1.5e-3 at 2048."""
    from mimkit.config import ConfigError, load_config
    import pytest
    cfg = load_config(REPO / "configs/perceptual-mae-lsgan-p_vit-b16_in1k-300e.yaml")
    assert (cfg.optim.lr, cfg.optim.lr_batch, cfg.optim.base_lr, cfg.data.batch_size) == (1.5e-4, 16, None, 16)
    assert Trainer.learning_rate(cfg.optim, 16)[0] == pytest.approx(1.5e-4)
    lr, how = Trainer.learning_rate(cfg.optim, 128)                               # 16 per GPU on 8 GPUs
    assert lr == pytest.approx(1.2e-3) and "scaled linearly to this run's 128" in how
    for recipe in ("cae_vit-b16_in1k-1600e.yaml", "cim-respix_vit-b16_in1k-300e.yaml"):
        assert Trainer.learning_rate(load_config(REPO / "configs" / recipe).optim, 2048)[0] == pytest.approx(1.5e-3)
    with pytest.raises(ConfigError, match="both set the learning rate"):
        load_config(REPO / "configs/cae_vit-b16_in1k-1600e.yaml", ["optim.base_lr=1e-4"])
    with pytest.raises(ConfigError, match="optim.lr and optim.lr_batch go together"):
        load_config(None, ["optim.lr=1e-3"])
    Trainer(tiny_config(fmnist_small, "mae", ["optim.base_lr=null", "optim.lr=1e-3", "optim.lr_batch=64"]), tmp_path / "r")
    assert ("lr 0.0005 (optim.lr 0.001 given for a global batch of 64, scaled linearly to this run's 32); global batch "
            "32 = 32 per device x 1 accumulation x 1 process(es)") in capsys.readouterr().out


def test_a_resumed_or_finished_run_does_not_call_earlier_stages_unreached(fmnist_small, tmp_path):
    """CIM's generator trains before the switch only: resumed after it, the run still reached it; a finished run
    has nothing left to say."""
    from mimkit.config import load_config
    cfg = load_config(None, ["method.name=cim", "method.generator=mae", "model.size=pico", "model.img_size=[28,28]",
                             "model.patch_size=4", "method.generator_depth=1", "method.mae_decoder_depth=1",
                             "method.generator_training=pretrain_then_freeze", "train.steps=4",
                             f"data.spec=idx:{fmnist_small}", "data.batch_size=16", "data.num_workers=0",
                             "train.log_every=1", "train.sample_every=0"])
    Trainer(cfg, tmp_path / "r").train(stop_after=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, tmp_path / "r", resume=True).train()
        Trainer(cfg, tmp_path / "r", resume=True).train()
    assert not [w for w in caught if "never run" in str(w.message)]
