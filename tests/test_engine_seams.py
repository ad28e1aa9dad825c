"""Engine seams the generator-discriminator methods need: stage schedules by epoch (and their resume),
per-stage logging, per-group optimiser settings, frozen parts, SimMIM's no-decay list, multistep lr."""
import hashlib
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import mimkit.methods as methods
from mimkit.config import ConfigError, load_config, method_options
from mimkit.engine.checkpoint import CheckpointError, load_checkpoint
from mimkit.engine.trainer import Trainer
from mimkit.methods.base import Method, Stage
from tests.conftest import tiny_config


@dataclass
class ToyOptions:
    loss_net: str | None = None       # a frozen "loss network" file (state dict of nn.Linear(784, 8))


class ScheduledToy(Method):
    """A tiny autoencoder with two stages: `recon` every step (groups a and b) and `sparse` (group a only,
    weight growing with the epoch) on even epochs only, as Perceptual MAE's even-epoch perceptual term."""

    options = ToyOptions
    stages = (Stage("recon", ("a", "b")), Stage("sparse", ("a",)))

    def __init__(self, cfg, in_chans, opts=None):
        super().__init__()
        self.opts = method_options(cfg) if opts is None else opts
        self.a, self.b = nn.Linear(784 * in_chans, 16), nn.Linear(16, 784 * in_chans)
        self.frozen_modes = []
        if self.opts.loss_net:
            net = nn.Sequential(nn.Linear(784 * in_chans, 8), nn.Dropout(0.5))
            net[0].load_state_dict(torch.load(self.opts.loss_net, weights_only=True))
            self.register_frozen("loss_net", net, self.opts.loss_net)

    def schedule(self, step, epoch, total_steps):
        return self.stages if epoch % 2 == 0 else self.stages[:1]

    def optim_groups(self):
        return {"a": list(self.a.named_parameters()), "b": list(self.b.named_parameters())}

    @property
    def encoder(self):
        return self.a

    def forward(self, images, stage="recon", carry=None):
        x = images.flatten(1)
        code = self.a(x)
        if stage == "sparse":
            loss = code.abs().mean() * (1 + carry["epoch"])
            return {"loss": loss, "parts": {"loss_l1_code": loss}}
        recon = self.b(code)
        loss = (recon - x).pow(2).mean()
        parts = {"loss_mse": loss}
        if self.opts.loss_net:
            self.frozen_modes.append(self.loss_net.training)
            parts["loss_feat"] = (self.loss_net(recon) - self.loss_net(x)).pow(2).mean()
            loss = loss + parts["loss_feat"]
        return {"loss": loss, "parts": parts}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "toy", ScheduledToy)


def toy_config(data, extra=()):
    return load_config(None, ["method.name=toy", "model.img_size=[28,28]", "model.patch_size=4", f"data.spec=idx:{data}",
                              "data.batch_size=256", "data.num_workers=0", "data.crop_scale=[0.5,1.0]",
                              "optim.base_lr=1e-2", "optim.warmup_epochs=0", "train.steps=24", "train.epochs=3",
                              "train.log_every=1",
                              "train.ckpt_every=1000", "train.sample_every=0", *extra])


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage_schedule_by_epoch_resumes_exactly(toy, fmnist_small, tmp_path):
    cfg = toy_config(fmnist_small)                      # 2048 images / 256 = 8 steps per epoch, 3 epochs
    Trainer(cfg, tmp_path / "full").train()
    Trainer(cfg, tmp_path / "cut").train(stop_after=12)  # in the middle of epoch 1 (no sparse stage)
    Trainer(cfg, tmp_path / "cut", resume=True).train()
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 25))
    for a, b in zip(full, cut):
        assert a.keys() == b.keys(), a["step"]
        for key in a:
            if key.startswith(("recon/", "sparse/", "loss")):
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    # epochs 0 and 2 run both stages, epoch 1 only `recon`: the log shows it, per stage
    by_step = {r["step"]: r for r in full}
    for step, row in by_step.items():
        epoch = (step - 1) // 8
        assert ("sparse/loss_l1_code" in row) == (epoch % 2 == 0), (step, sorted(row))
        assert {"recon/loss_mse", "recon/grad_norm_a", "recon/grad_norm_b"} <= set(row)
    # group a is stepped in both stages: two gradient norms; the sparse weight follows the epoch (x1, x3)
    assert {"recon/grad_norm_a", "sparse/grad_norm_a"} <= set(by_step[1]) and "sparse/grad_norm_b" not in by_step[1]
    assert abs(by_step[1]["loss"] - by_step[1]["recon/loss"] - by_step[1]["sparse/loss"]) < 1e-5
    assert by_step[17]["sparse/loss_l1_code"] > 1.5 * by_step[8]["sparse/loss_l1_code"]


def test_frozen_part_stays_eval_has_no_state_and_is_named_by_hash(toy, fmnist_small, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "loss_net.pt"
    torch.save(nn.Linear(784, 8).state_dict(), path)
    cfg = toy_config(fmnist_small, [f"method.loss_net={path}", "train.steps=4"])
    trainer = Trainer(cfg, tmp_path / "run")
    frozen = trainer.method.loss_net
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    trainer.train(stop_after=2)
    assert trainer.method.frozen_modes and not any(trainer.method.frozen_modes)      # eval mode while training
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())   # never updated
    optimised = {id(p) for opt in trainer.optimizers.values() for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in frozen.parameters())
    ckpt = load_checkpoint(tmp_path / "run/last.pt")
    assert not any(k.startswith("loss_net.") for k in ckpt["model"])
    assert ckpt["frozen"]["loss_net"] == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    Trainer(cfg, tmp_path / "run", resume=True).train()                 # reloaded from the file, hash checked
    torch.save(nn.Linear(784, 8).state_dict(), path)                    # the file changed under the run
    with pytest.raises(CheckpointError, match="was trained with the frozen loss_net"):
        Trainer(cfg, tmp_path / "run", resume=True)


def test_per_group_optimiser_settings(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "mae", [
        "method.name=vision_electra", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
        "optim.warmup_epochs=0", "optim.betas=[0.9,0.95]", "optim.groups.discriminator.lr_scale=0.5",
        "optim.groups.discriminator.betas=[0.5,0.9]", "optim.groups.discriminator.weight_decay=0.0",
        "optim.groups.generator.warmup_epochs=1", "train.epochs=2", "train.log_every=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    g, d = trainer.optimizers["generator"], trainer.optimizers["discriminator"]
    assert d.defaults["betas"] == (0.5, 0.9) and g.defaults["betas"] == (0.9, 0.95)
    assert [pg["weight_decay"] for pg in d.param_groups] == [0.0, 0.0]
    assert [pg["weight_decay"] for pg in g.param_groups] == [0.0, 0.05]
    trainer.train(stop_after=2)
    row = rows(tmp_path / "run")[1]                                     # step 2 of 128, 64 per epoch
    assert row["lr_discriminator"] == pytest.approx(trainer.lr * 0.5, rel=1e-3)        # no warm-up, half the lr
    assert row["lr_generator"] == pytest.approx(trainer.lr / 64, rel=1e-4)             # warming up over an epoch


def test_group_settings_are_checked_when_the_config_is_read():
    with pytest.raises(ConfigError, match="has no optimiser group 'critic'; its groups are discriminator, generator"):
        load_config(None, ["method.name=vision_electra", "optim.groups.critic.lr_scale=2"])
    with pytest.raises(ConfigError, match="did you mean 'optim.groups.generator.lr_scale'"):
        load_config(None, ["method.name=vision_electra", "optim.groups.generator.lr_scal=2"])
    with pytest.raises(ConfigError, match="lr_scale=0.0 is out of range"):
        load_config(None, ["method.name=vision_electra", "optim.groups.generator.lr_scale=0"])


def test_simmim_keeps_tokens_and_positions_out_of_weight_decay(fmnist_small, tmp_path):
    trainer = Trainer(tiny_config(fmnist_small, "simmim", ["train.steps=1"]), tmp_path / "run")
    no_decay = {id(p) for p in trainer.optimizers["model"].param_groups[0]["params"]}
    backbone = trainer.method.backbone
    for p in (backbone.mask_token, backbone.model.cls_token, backbone.model.pos_embed):
        assert id(p) in no_decay
    assert id(backbone.model.blocks[0].attn.qkv.weight) not in no_decay
    mae = Trainer(tiny_config(fmnist_small, "mae", ["train.steps=1"]), tmp_path / "mae")
    decayed = {id(p) for p in mae.optimizers["model"].param_groups[1]["params"]}
    assert id(mae.method.generator.mask_token) in decayed        # MAE's own rule: only biases and norms are exempt


def test_multistep_schedule_divides_lr_at_the_milestone(fmnist_small, tmp_path):
    cfg = tiny_config(fmnist_small, "simmim", ["data.batch_size=256", "train.epochs=4", "optim.warmup_epochs=1",
                                               "optim.schedule=multistep", "optim.milestones=[2]",
                                               "optim.decay_rate=0.1"])
    trainer = Trainer(cfg, tmp_path / "run")                     # 8 steps per epoch: warm-up 8, milestone 16
    scheduler, lr = trainer.schedulers["model"], trainer.lr
    lrs = {}
    for step in (4, 8, 15, 16, 31):
        scheduler.step_update(step)
        lrs[step] = trainer.optimizers["model"].param_groups[0]["lr"]
    assert lrs[4] == pytest.approx(lr * 4 / 8) and lrs[8] == pytest.approx(lr) and lrs[15] == pytest.approx(lr)
    assert lrs[16] == pytest.approx(0.1 * lr) and lrs[31] == pytest.approx(0.1 * lr)
