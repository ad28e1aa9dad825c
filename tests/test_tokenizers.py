"""Tokenizers: DALL-E's dVAE (trained here, or converted from the release's pickles), the VQ-VAE, one interface,
frozen use inside a method, and the bad inputs around them."""
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import mimkit.methods as methods
from mimkit.cli import main
from mimkit.config import load_config, method_options
from mimkit.engine.checkpoint import CheckpointError, load_checkpoint
from mimkit.engine.trainer import Trainer
from mimkit.losses import logit_laplace_nll
from mimkit.methods.base import Method
from mimkit.methods.dvae import cosine_ramp
from mimkit.tokenizers import DiscreteVAE, VQTokenizer, load_tokenizer, save_tokenizer
from mimkit.tokenizers.dvae import map_pixels, unmap_pixels
from tests.conftest import REPO
from tests.test_cli import error_of

DVAE_TINY = ["method.name=dvae", "method.vocab_size=64", "method.n_hid=16", "method.n_init=16", "method.groups=3",
             "method.blocks_per_group=1", "method.kl_weight=0.5", "method.temperature_anneal=0.5", "method.kl_warmup=0.1"]
VQ_TINY = ["method.name=vqvae", "method.vocab_size=64", "method.codebook_dim=16", "method.n_hid=16", "method.n_init=16",
           "method.groups=3", "method.blocks_per_group=1"]


def tokenizer_config(data, method, extra=()):
    return load_config(None, [*method, "model.img_size=[28,28]", "model.patch_size=4", f"data.spec=idx:{data}",
                              "data.batch_size=64", "data.num_workers=0", "data.crop_scale=[0.8,1.0]",
                              "optim.base_lr=2e-3", "optim.weight_decay=1e-4", "optim.betas=[0.9,0.999]",
                              "optim.warmup_epochs=0", "train.log_every=5", "train.ckpt_every=1000",
                              "train.sample_every=0", *extra])


# ---------------------------------------------------------------------- DALL-E's release
def test_dalle_pickles_convert_to_the_same_function(tmp_path):
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, vocab_size=512, input_channels=3, requires_grad=False)
    dec = dall_e.Decoder(n_init=32, n_hid=64, vocab_size=512, output_channels=3, requires_grad=False)
    for module in (enc, dec):                    # the package's init leaves biases at 0: make them count
        for p in module.parameters():
            p.data.add_(0.01 * torch.randn_like(p))
    torch.save(enc, tmp_path / "encoder.pkl")    # as the release: whole pickled modules
    torch.save(dec, tmp_path / "decoder.pkl")
    assert main(["tokenizer", "convert-dalle", "--encoder", str(tmp_path / "encoder.pkl"), "--decoder",
                 str(tmp_path / "decoder.pkl"), "--out", str(tmp_path / "dalle.safetensors"), "--trust-pickle"]) == 0
    ours = load_tokenizer(tmp_path / "dalle.safetensors")
    assert isinstance(ours, DiscreteVAE) and ours.downsample == 8 and ours.vocab_size == 512
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        theirs_logits = enc(dall_e.map_pixels(x))
        assert torch.allclose(ours.logits(x), theirs_logits, atol=1e-5, rtol=1e-5)
        z = F.one_hot(theirs_logits.argmax(1), 512).permute(0, 3, 1, 2).float()
        theirs_out = dec(z)
        assert torch.allclose(ours.decoder_output(z), theirs_out, atol=1e-5, rtol=1e-5)
        expected = dall_e.unmap_pixels(torch.sigmoid(theirs_out[:, :3]))
        assert torch.allclose(ours.decode(ours.encode(x)), expected, atol=1e-5)


def test_pickles_need_trust(capsys, tmp_path):
    (tmp_path / "encoder.pkl").write_bytes(b"not read")
    (tmp_path / "decoder.pkl").write_bytes(b"not read")
    err = error_of(capsys, ["tokenizer", "convert-dalle", "--encoder", str(tmp_path / "encoder.pkl"), "--decoder",
                            str(tmp_path / "decoder.pkl"), "--out", str(tmp_path / "d.safetensors")])
    assert "--trust-pickle" in err
    with pytest.raises(CheckpointError, match="pickle, which mimkit does not load"):
        load_tokenizer(tmp_path / "encoder.pkl")


# ---------------------------------------------------------------------- objective pieces
def test_logit_laplace_nll_hand_value():
    x = torch.tensor([0.3, 0.8]).view(1, 1, 1, 2)
    mu, log_b = torch.tensor([0.1, -0.5]), torch.tensor([0.2, -1.0])
    output = torch.cat([mu.view(1, 1, 1, 2), log_b.view(1, 1, 1, 2)], dim=1)
    hand = [abs(math.log(v / (1 - v)) - m) / math.exp(b) + b + math.log(2) + math.log(v * (1 - v))
            for v, m, b in zip([0.3, 0.8], mu.tolist(), log_b.tolist())]
    assert logit_laplace_nll(x, output).item() == pytest.approx(sum(hand) / 2, rel=1e-5)


def test_pixel_mapping_and_anneals():
    x = torch.rand(2, 1, 4, 4)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6) and map_pixels(x).min() >= 0.1
    assert cosine_ramp(1.0, 1 / 16, 0, 100) == 1.0 and cosine_ramp(1.0, 1 / 16, 100, 100) == 1 / 16
    assert cosine_ramp(1.0, 1 / 16, 50, 100) == pytest.approx((1 + 1 / 16) / 2)
    assert cosine_ramp(0.0, 6.6, 10, 0) == 6.6


def test_dvae_kl_to_uniform_prior(fmnist_small):
    cfg = tokenizer_config(fmnist_small, DVAE_TINY)
    method = methods.build_method(cfg, 1)
    method.set_pixel_stats(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    carry = {"step": 10**6, "epoch": 0, "total_steps": 10**6}
    method.tokenizer.logits = lambda x: torch.zeros(x.shape[0], 64, 7, 7)      # q = uniform: KL 0
    assert method(torch.rand(2, 1, 28, 28), carry=carry)["parts"]["loss_kl"].abs().item() < 1e-6
    method.tokenizer.logits = lambda x: torch.full((x.shape[0], 64, 7, 7), -1e4).index_fill(1, torch.tensor([3]), 1e4)
    kl = method(torch.rand(2, 1, 28, 28), carry=carry)["parts"]["loss_kl"].item()
    assert kl == pytest.approx(49 * math.log(64) / 784, rel=1e-4)            # one-hot q: log V per position / pixels


def test_dvae_batch_averaged_kl_asks_for_usage_not_uncertainty(fmnist_small):
    cfg = tokenizer_config(fmnist_small, DVAE_TINY + ["method.kl_to_prior=batch_average"])
    method = methods.build_method(cfg, 1)
    method.set_pixel_stats(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    carry = {"step": 10**6, "epoch": 0, "total_steps": 10**6}

    def one_hot_logits(codes):
        ids = torch.tensor(codes).view(-1, 1, 1, 1).expand(-1, 1, 7, 7)
        return lambda x: torch.full((len(codes), 64, 7, 7), -1e4).scatter(1, ids, 1e4)

    # two images, each sure of one code everywhere: q_mean puts 1/2 on each of 2 codes -> KL = log(64 / 2)
    method.tokenizer.logits = one_hot_logits([3, 5])
    kl = method(torch.rand(2, 1, 28, 28), carry=carry)["parts"]["loss_kl"].item()
    assert kl == pytest.approx(49 * math.log(32) / 784, rel=1e-4)
    method.tokenizer.logits = one_hot_logits([3, 3])                            # one code for everything: log 64
    assert method(torch.rand(2, 1, 28, 28), carry=carry)["parts"]["loss_kl"].item() == pytest.approx(
        49 * math.log(64) / 784, rel=1e-4)


def test_vq_logits_pick_the_quantiser_codes():
    torch.manual_seed(0)
    vq = VQTokenizer(1, 64, 16, 16, 16, 3, 1, [28, 28])
    x = torch.rand(32, 1, 28, 28)
    vq.quantize(x)                                   # k-means initialises the codebook (training mode)
    vq.eval()
    assert torch.equal(vq.encode(x), vq.quantize(x)[1])
    assert vq.decode(vq.encode(x)).shape == (32, 1, 28, 28)


# ---------------------------------------------------------------------- training on the engine
@pytest.mark.parametrize("kind", ["dvae", "vqvae"])
def test_tiny_tokenizer_trains_resumes_and_evaluates(kind, fmnist_small, tmp_path, capsys):
    cfg = tokenizer_config(fmnist_small, DVAE_TINY if kind == "dvae" else VQ_TINY, ["train.steps=30"])
    Trainer(cfg, tmp_path / "full").train()
    Trainer(cfg, tmp_path / "cut").train(stop_after=15)
    Trainer(cfg, tmp_path / "cut", resume=True).train()
    full = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(line) for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in full] == [5, 10, 15, 20, 25, 30]
    for a, b in zip(full, cut):                       # the anneals and the EMA codebook resume exactly
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    key = "loss_recon"
    assert full[-1][key] < full[0][key] - 0.1 * abs(full[0][key]), [r[key] for r in full]
    if kind == "dvae":
        assert full[0]["temperature"] > full[-1]["temperature"] == pytest.approx(1 / 16)
    tokenizer = load_tokenizer(tmp_path / "full")
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    assert main(["tokenizer", "eval", "--tokenizer", str(tmp_path / "full"), "--data", f"idx:{fmnist_small}",
                 "--num-images", "200"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["grid"] == [7, 7] and result["vocab_size"] == 64 and 1 <= result["codes_used"] <= 64
    assert 0 < result["ssim"] <= 1 and 1 <= result["perplexity"] <= 64
    from mimkit.data import build_dataset
    x = build_dataset(f"idx:{fmnist_small}", "test").images[:200].float() / 255
    mse = (tokenizer.decode(tokenizer.encode(x)).clamp(0, 1) - x).pow(2).mean((1, 2, 3))
    assert result["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), abs=1e-2)
    ids = tokenizer.encode(x)
    assert result["codes_used"] == len(ids.unique())
    png = tmp_path / "show.png"
    assert main(["tokenizer", "show", "--tokenizer", str(tmp_path / "full/last.pt"), "--out", str(png),
                 "--data", f"idx:{fmnist_small}", "--num-images", "4"]) == 0
    assert Image.open(png).size[0] > 4 * 28
    # a tokenizer file written from the run loads to the same function
    save_tokenizer(tokenizer, tmp_path / "t.safetensors")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(load_tokenizer(tmp_path / "t.safetensors").encode(x), tokenizer.encode(x))


def test_tokenizer_recipes_load():
    for name in ("dvae_fmnist-tiny", "vq_fmnist-tiny", "dvae_in1k-112px"):
        cfg = load_config(REPO / f"configs/tokenizer/{name}.yaml")
        method = methods.build_method(cfg, 3 if "in1k" in name else 1)
        assert method.tokenizer.grid_for(cfg.model.img_size) == ((14, 14) if "in1k" in name else (7, 7))
    big = methods.build_method(load_config(REPO / "configs/tokenizer/dvae_in1k-112px.yaml"), 3).tokenizer
    assert big.vocab_size == 8192 and big.downsample == 8


# ---------------------------------------------------------------------- frozen inside a method
@dataclass
class TokenPredictorOptions:
    pass


class TokenPredictor(Method):
    """A minimal user of a tokenizer: a linear head on each patch's pixels predicts the tokenizer's id there."""

    options = TokenPredictorOptions

    def __init__(self, cfg, in_chans, opts=None):
        super().__init__()
        self.opts = method_options(cfg) if opts is None else opts
        p = cfg.model.patch_size
        self.patch = p
        grid = (cfg.model.img_size[0] // p, cfg.model.img_size[1] // p)
        self.attach_tokenizer(cfg, in_chans, grid)
        self.head = nn.Linear(p * p * in_chans, self.tokenizer.vocab_size)
        self.modes = []

    @property
    def encoder(self):
        return self.head

    def forward(self, images, stage="model", carry=None):
        self.modes.append(self.tokenizer.training)
        with torch.no_grad():
            target = self.token_ids(images)                                         # [B, h*w]
        patches = F.unfold(images, self.patch, stride=self.patch).transpose(1, 2)     # [B, L, p*p*C]
        loss = F.cross_entropy(self.head(patches).flatten(0, 1), target.flatten())
        return {"loss": loss, "parts": {"loss_ce": loss}}


@pytest.fixture
def tiny_tokenizer_file(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "token_predictor", TokenPredictor)
    torch.manual_seed(0)
    path = tmp_path / "tok.safetensors"
    save_tokenizer(DiscreteVAE(1, 64, 16, 16, 3, 1, [28, 28]), path)
    return path


def test_frozen_tokenizer_does_not_change_and_stays_in_eval(tiny_tokenizer_file, fmnist_small, tmp_path):
    cfg = load_config(None, ["method.name=token_predictor", f"tokenizer.path={tiny_tokenizer_file}",
                             "model.img_size=[28,28]", "model.patch_size=4", f"data.spec=idx:{fmnist_small}",
                             "data.batch_size=32", "data.num_workers=0", "optim.warmup_epochs=0", "train.steps=3",
                             "train.log_every=1", "train.sample_every=0"])
    trainer = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.method.tokenizer.state_dict().items()}
    head_before = trainer.method.head.weight.clone()
    trainer.train()
    after = trainer.method.tokenizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, trainer.method.head.weight)            # the method itself did learn
    assert trainer.method.modes and not any(trainer.method.modes)
    ckpt = load_checkpoint(tmp_path / "run/last.pt")
    assert not any(k.startswith("tokenizer.") for k in ckpt["model"])
    assert ckpt["frozen"]["tokenizer"]["settings"]["vocab_size"] == 64 and len(ckpt["frozen"]["tokenizer"]["sha256"]) == 64


def test_tokenizer_misuse_is_one_sentence(tiny_tokenizer_file, fmnist_small, tmp_path, capsys):
    recipe = tmp_path / "token_predictor.yaml"
    recipe.write_text("method: {name: token_predictor}\nmodel: {img_size: [28, 28], patch_size: 4}\n"
                      "data: {batch_size: 8, num_workers: 0}\ntrain: {steps: 1, sample_every: 0}\n")

    def base(data):
        return ["pretrain", "--config", str(recipe), "--out", str(tmp_path / "r"), "--data", data]
    err = error_of(capsys, base(f"idx:{fmnist_small}") + [f"tokenizer.path={tiny_tokenizer_file}", "model.patch_size=7",
                                                          "tokenizer.input_size=[28,28]"])
    assert "7x7 token grid at tokenizer.input_size=[28, 28]" in err and "predicts on a 4x4 grid" in err
    assert "set tokenizer.input_size=[16,16]" in err
    err = error_of(capsys, base(f"idx:{fmnist_small}") + [f"tokenizer.path={tiny_tokenizer_file}",
                                                          "tokenizer.input_size=[30,30]"])
    assert "not a multiple of the tokenizer's down-sampling (4)" in err
    err = error_of(capsys, base(f"idx:{fmnist_small}") + [f"tokenizer.path={tmp_path / 'missing.pt'}"])
    assert "tokenizer file" in err and "does not exist" in err
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(rgb / f"{i}.png")
    err = error_of(capsys, base(f"folder:{rgb}") + [f"tokenizer.path={tiny_tokenizer_file}"])
    assert "trained on 1-channel images but the data has 3 channels" in err
