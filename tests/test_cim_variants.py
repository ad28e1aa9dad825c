"""CIM beyond the ViT enhancer: the ResNet enhancer (token map, pixel head, export, probes), the MAE-style generator
with RGB-level sampling (Table 10) and the generator trained first then frozen (A.1)."""
import pytest
import torch
import torch.nn.functional as F

from mimkit.config import ConfigError, load_config
from mimkit.methods import build_method
from mimkit.methods.cim import CIM, ENHANCER_ONLY, GENERATOR_ONLY, JOINT
from mimkit.patches import patchify, unpatchify
from mimkit.targets import sliding_window_pixels
from tests.conftest import assert_export_is_the_result, freeze_mask, metrics_rows, train_cut_and_resume

CIM_RESNET = ["method.name=cim", "model.arch=resnet", "model.size=mini", "model.pool=mean", "model.output_stride=8",
              "method.generator_depth=2", "method.generator_width=64", "method.generator_heads=2"]
CIM_MAE_GEN = ["method.name=cim", "method.generator=mae", "model.size=pico", "model.img_size=[28,28]",
               "model.patch_size=4", "method.generator_depth=2", "method.mae_decoder_depth=1", "method.rgb_bins=8"]


def build(overrides, seed=0):
    torch.manual_seed(seed)
    method = build_method(load_config(None, list(overrides)), 1)
    method.set_pixel_stats(torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.35))
    return method


def grads(loss, params):
    got = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: g for n, g in zip(params, got) if g is not None and g.abs().sum() > 0}


@pytest.fixture(scope="module")
def tokenizer_8x8(tmp_path_factory):
    """A random-weight tiny d-VAE giving an 8x8 token grid on 32 px images."""
    from mimkit.tokenizers import DiscreteVAE, save_tokenizer
    torch.manual_seed(6)
    path = tmp_path_factory.mktemp("tok8") / "dvae.safetensors"
    save_tokenizer(DiscreteVAE(1, 64, 16, 16, 3, 1, [32, 32]), path)
    return path


def test_token_map_covers_coarser_and_finer_feature_maps():
    assert CIM.token_map((7, 7), (7, 7)) == (1, 1)
    assert CIM.token_map((7, 7), (14, 14)) == (2, 1)        # ResNet-50 at 224 px against DALL-E's 14x14 grid
    assert CIM.token_map((28, 28), (14, 14)) == (1, 2)      # output stride 8: pooled onto the grid
    with pytest.raises(ValueError, match="does not tile"):
        CIM.token_map((4, 4), (7, 7))


def test_resnet_revdet_cell_predicts_its_tokens(tokenizer_8x8):
    """A 4x4 map against an 8x8 token grid: each cell's 4 logits land on its 2x2 tokens; the loss is the BCE."""
    method = build(CIM_RESNET + ["method.objective=revdet", "model.img_size=[32,32]", "model.patch_size=4", "method.sampling=uniform",
                                 f"tokenizer.path={tokenizer_8x8}"])
    assert (method.map_grid, method.token_grid, method.tokens_per_cell) == ((4, 4), (8, 8), 2)
    assert method.head.out_features == 4 and method.generator.backbone.patch_size == (4, 4)
    out = torch.arange(2 * 16 * 4, dtype=torch.float).view(2, 16, 4)
    logits = method.revdet_logits(out).view(2, 8, 8)
    for cell_row, cell_col in ((0, 0), (1, 3), (3, 2)):
        cell = out[1, cell_row * 4 + cell_col].view(2, 2)
        assert torch.equal(logits[1, 2 * cell_row:2 * cell_row + 2, 2 * cell_col:2 * cell_col + 2], cell)
    images = torch.randn(2, 1, 32, 32)
    mask = freeze_mask(method, images)
    method.eval()                            # BatchNorm from running stats, so two forwards agree
    torch.manual_seed(3)
    result = method(images)
    torch.manual_seed(3)
    c = method.corrupt(images, mask)
    labels = ((c["corrupted_ids"] != c["golden"]) & mask).float()
    expected = F.binary_cross_entropy_with_logits(method.revdet_logits(method.enhance(c["corrupted"])), labels)
    assert result["parts"]["loss_revdet"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_resnet_respix_cell_predicts_its_pixels(tiny_tokenizer):
    method = build(CIM_RESNET + ["model.img_size=[56,56]", "model.patch_size=8", "method.sampling=argmax", f"tokenizer.path={tiny_tokenizer}"])
    assert (method.map_grid, method.cell, method.token_grid) == ((7, 7), (8, 8), (7, 7))
    method.eval()
    images = torch.randn(2, 1, 56, 56)
    mask = freeze_mask(method, images)
    result = method(images)
    c = method.corrupt(images, mask)
    fmap = method.enhancer.model.forward_features(c["corrupted"])                        # [2, 256, 7, 7]
    pred = unpatchify(method.head(fmap.flatten(2).transpose(1, 2)), 8, (7, 7), 1)
    diff = pred - sliding_window_pixels(images, 8)
    assert result["parts"]["loss_respix"].item() == pytest.approx((diff.abs().mean() + diff.pow(2).mean()).item(),
                                                                 abs=1e-4)
    gen_only = dict(method.optim_groups()["generator"])
    assert grads(result["loss"], gen_only) and not grads(result["parts"]["loss_respix"], gen_only)


def test_mae_style_generator_samples_rgb_levels_at_masked_patches():
    method = build(CIM_MAE_GEN + ["method.objective=revdet"])
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    mask = freeze_mask(method, images)
    c = method.corrupt(images, mask)
    levels = (method.to_pixels(images) * 8).floor().clamp(max=7).long()
    assert torch.equal(c["golden"], patchify(levels, 4))
    assert c["logits"].shape == (2, 49, 16, 8)
    visible = ~mask
    assert torch.equal(c["corrupted_ids"][visible], c["golden"][visible])               # only masked patches sampled
    expected_image = method.from_pixels(unpatchify((c["corrupted_ids"].float() + 0.5) / 8, 4, (7, 7), 1))
    assert torch.allclose(c["corrupted"], expected_image)
    assert torch.equal(c["replaced"], ((c["corrupted_ids"] != c["golden"]).any(-1) & mask).float())
    assert c["replaced"][mask].mean() > 0.9                  # 16 values from 8 levels: almost never all equal
    out = method(images)
    logits, golden = method.generator(images, mask).unflatten(-1, (16, 8))[mask], c["golden"][mask]
    assert out["parts"]["loss_gen"].item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), golden.flatten()).item(),
                                                           abs=1e-5)
    gen_only = dict(method.optim_groups()["generator"])
    assert not grads(out["parts"]["loss_revdet"], gen_only) and grads(out["parts"]["loss_gen"], gen_only)
    assert not hasattr(method, "tokenizer")                  # no tokenizer needed


def test_pretrain_then_freeze_trains_one_side_at_a_time(tiny_tokenizer):
    method = build(["method.name=cim", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
                    "method.generator_depth=2", "method.generator_training=pretrain_then_freeze",
                    "method.generator_pretrain_share=0.3", f"tokenizer.path={tiny_tokenizer}"])
    assert [method.schedule(s, 0, 100)[0] for s in (0, 29, 30, 99)] == [GENERATOR_ONLY] * 2 + [ENHANCER_ONLY] * 2
    assert method.generator.backbone.model.blocks[0] is not method.enhancer.model.blocks[0]   # nothing shared
    images = torch.randn(2, 1, 28, 28)
    freeze_mask(method, images)
    groups = method.optim_groups()
    gen, enh = dict(groups["generator"]), dict(groups["enhancer"])
    first = method(images, "generator")
    assert set(first["parts"]) == {"loss_gen", "gen_token_accuracy"}
    assert grads(first["loss"], gen) and not grads(first["loss"], enh)
    second = method(images, "enhancer")
    assert "loss_gen" not in second["parts"] and grads(second["loss"], enh)
    assert not grads(second["loss"], gen)
    joint = build(["method.name=cim", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
                   "method.generator_depth=2", f"tokenizer.path={tiny_tokenizer}"])
    assert joint.schedule(0, 0, 10) == (JOINT,) and joint.opts.shared_layers("vit") == 2


@pytest.mark.parametrize("overrides, sentence", [
    (["method.name=mae", "model.arch=resnet", "model.pool=mean"], "method mae pre-trains model.arch=vit, not 'resnet'"),
    (CIM_RESNET + ["model.img_size=[60,60]"], "must be a multiple of model.output_stride=8"),
    (CIM_RESNET + ["model.img_size=[56,56]", "method.share_layers=2"], "needs a ViT enhancer and the BEiT generator"),
    (CIM_RESNET + ["model.img_size=[56,56]", "model.patch_size=8", "model.pool=cls"], "mean for a ResNet"),
    (CIM_RESNET + ["model.img_size=[56,56]"], "model.patch_size=16 \\(with a ResNet enhancer: the generator's patch"),
    (CIM_MAE_GEN + ["method.masking=block"], "method.generator=mae needs method.masking=random"),
    (["method.name=cim", "method.generator_training=pretrain_then_freeze", "method.share_layers=2"],
     "cannot share layers"),
    (["method.name=cim", "model.size=pico", "method.generator_width=96"], "shared layers need a generator as wide"),
])
def test_variant_option_errors_are_one_sentence(overrides, sentence):
    with pytest.raises((ConfigError, ValueError), match=sentence):
        load_config(None, overrides)


def test_tiny_resnet_cim_resumes_exactly_exports_and_probes(fmnist_small, tmp_path, tiny_tokenizer):
    from mimkit.eval.encoders import probe_subject
    from mimkit.eval.features import embed
    cfg = load_config(None, CIM_RESNET + ["method.objective=revdet", "model.img_size=[56,56]", "model.patch_size=8",
                                          f"tokenizer.path={tiny_tokenizer}", f"data.spec=idx:{fmnist_small}",
                                          "data.batch_size=8", "data.num_workers=0", "optim.base_lr=2e-3",
                                          "optim.warmup_epochs=0", "train.log_every=1", "train.ckpt_every=1000",
                                          "train.sample_every=0", "train.steps=5"])
    full, cut = train_cut_and_resume(cfg, tmp_path)
    assert [r["step"] for r in cut] == list(range(1, 6))
    for a, b in zip(full, cut):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    ckpt = tmp_path / "full" / "last.pt"
    assert_export_is_the_result(ckpt, tmp_path / "export" / "resnet")
    subject = probe_subject(str(tmp_path / "export" / "resnet.safetensors"))
    assert subject.img_size == [56, 56] and subject.pool == "mean" and subject.timm_spec[0] == "resnet18"
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        assert torch.allclose(embed(subject.model, x, subject.pool), subject.model.forward_features(x).mean((2, 3)))
    from mimkit.cli import main                                     # every probe and the report take the ResNet
    data = ["--data", f"idx:{fmnist_small}", "--train-limit", "300", "--test-limit", "100"]
    export = str(tmp_path / "export" / "resnet.safetensors")
    for argv in (["eval", "knn", "--ckpt", export], ["eval", "linear", "--ckpt", export, "--epochs", "2"],
                 ["eval", "finetune", "--ckpt", str(ckpt), "--recipe", "configs/finetune/fmnist-tiny.yaml",
                  "--set", "epochs=1", "--set", "num_workers=0"]):
        assert main(argv + data) == 0, argv
    assert main(["eval", "report", str(tmp_path / "full"), f"random:{tmp_path / 'full'}", "--protocols",
                 "knn,linear,attentive", "--out", str(tmp_path / "rep"), *data]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "random init (cim resnet-mini)" in report and (tmp_path / "rep" / "reconstruction-0.png").exists()


def test_frozen_generator_run_keeps_the_generator_after_the_switch(fmnist_small, tmp_path, tiny_tokenizer):
    from mimkit.engine.checkpoint import load_checkpoint
    from mimkit.engine.trainer import Trainer
    cfg = load_config(None, ["method.name=cim", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
                             "method.generator_depth=2", "method.generator_training=pretrain_then_freeze",
                             f"tokenizer.path={tiny_tokenizer}", f"data.spec=idx:{fmnist_small}", "data.batch_size=8",
                             "data.num_workers=0", "optim.warmup_epochs=0", "optim.base_lr=2e-3", "train.log_every=1",
                             "train.ckpt_every=1000", "train.sample_every=0", "train.steps=4"])
    Trainer(cfg, tmp_path / "run").train(stop_after=2)                   # the switch is at step 2 of 4
    at_switch = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    Trainer(cfg, tmp_path / "run", resume=True).train()
    final = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    rows = metrics_rows(tmp_path / "run")
    assert [sorted(k for k in r if k.endswith("loss")) for r in rows] == \
        [["generator/loss", "loss"]] * 2 + [["enhancer/loss", "loss"]] * 2
    generator = [k for k in final if k.startswith("generator.")]
    enhancer = [k for k in final if k.startswith(("enhancer.", "head."))]
    assert generator and all(torch.equal(final[k], at_switch[k]) for k in generator)      # fixed after the switch
    assert any(not torch.equal(final[k], at_switch[k]) for k in enhancer)                # the enhancer trains


def test_the_enhancer_after_a_frozen_generator_is_its_own_run_for_the_lr(fmnist_small, tmp_path, tiny_tokenizer):
    """A.1: the generator's 300 epochs, then the enhancer's 300 as a run of its own: each group warms up from its
    own first step and decays over its own part (before: the enhancer began at the switch mid-cosine, no warm-up)."""
    from mimkit.engine.trainer import Trainer
    cfg = load_config(None, ["method.name=cim", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
                             "method.generator_depth=2", "method.generator_training=pretrain_then_freeze",
                             f"tokenizer.path={tiny_tokenizer}", f"data.spec=idx:{fmnist_small}", "data.batch_size=8",
                             "data.num_workers=0", "train.epochs=2", "optim.warmup_epochs=0.5", "optim.base_lr=1e-3",
                             "optim.min_lr=0", "train.log_every=1", "train.sample_every=0", "train.steps=12"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.spans == {"generator": (0, 6), "enhancer": (6, 12)} and trainer.warmup_steps == 3
    trainer.train()
    rows = metrics_rows(tmp_path / "run")
    peak = 1e-3 * 8 / 256
    gen = [r["lr_generator"] for r in rows[:6]]                          # the lr each step used
    enh = [r["lr_enhancer"] for r in rows[6:]]
    warm = [0.0, peak / 3, 2 * peak / 3, peak]
    assert gen[:4] == pytest.approx(warm, rel=1e-6, abs=1e-12) and gen[3] > gen[4] > gen[5] > 0
    assert enh[:4] == pytest.approx(warm, rel=1e-6, abs=1e-12) and enh[3] > enh[4] > enh[5] > 0


@pytest.mark.parametrize("scope", [None, "group"])
def test_cim_clips_one_global_norm_over_both_groups(fmnist_small, tmp_path, tiny_tokenizer, scope):
    """BEiT-style code (CIM's) clips the norm of all the step's gradients together: the generator's and the enhancer's
    are scaled by one factor so that their joint norm is clip_grad (`optim.clip_scope=group`: each to clip_grad)."""
    from mimkit.engine.trainer import Trainer
    cfg = load_config(None, ["method.name=cim", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
                             "method.generator_depth=2", f"tokenizer.path={tiny_tokenizer}", f"data.spec=idx:{fmnist_small}",
                             "data.batch_size=8", "data.num_workers=0", "optim.clip_grad=1e-4", "train.log_every=1",
                             "train.sample_every=0", "train.steps=1"] + ([f"optim.clip_scope={scope}"] if scope else []))
    trainer = Trainer(cfg, tmp_path / "run")
    seen = {}
    for group, optimizer in trainer.optimizers.items():
        step = optimizer.step

        def recorded(*args, group=group, step=step, **kwargs):
            seen[group] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params[group]
                                                                if p.grad is not None]))
            return step(*args, **kwargs)
        optimizer.step = recorded
    trainer.train()
    total = torch.linalg.vector_norm(torch.stack(list(seen.values())))
    row = metrics_rows(tmp_path / "run")[-1]
    if scope is None:
        assert total.item() == pytest.approx(1e-4, rel=1e-3) and row["grad_norm"] > 1e-4
    else:
        assert all(v.item() == pytest.approx(1e-4, rel=1e-3) for v in seen.values()), seen
        assert {"grad_norm_generator", "grad_norm_enhancer"} <= set(row)


def test_table_10_mae_generator_has_a_decoder_width_of_its_own():
    """Table 10's MAE-Base generator: MAE's decoder (512 wide at ViT-B) behind a wider encoder; scaled down here."""
    method = build(CIM_MAE_GEN + ["method.generator_width=64", "method.generator_heads=4", "method.mae_decoder_dim=32",
                                 "method.mae_decoder_heads=2"])
    gen = method.generator
    assert gen.encoder.embed_dim == 64 and tuple(gen.decoder_embed.weight.shape) == (32, 64)
    assert gen.decoder_blocks[0].attn.num_heads == 2
    assert torch.isfinite(method(torch.randn(2, 1, 28, 28))["loss"])


def test_resnet_50_starts_as_torchvisions_and_beits_exemptions_hold(tiny_tokenizer):
    """The paper's ResNet-50 is torchvision's: each bottleneck's last BN starts at 1 (timm zero-inits it unless told);
    no weight decay on position tables and class tokens (BEiT's no_weight_decay), as on biases and norms."""
    from mimkit.backbones import ResNetBackbone
    from mimkit.engine.trainer import make_optimizer
    from mimkit.config import GroupOptimConfig
    blocks = [b for stage in ResNetBackbone((64, 64), 3, "50").model.children() if isinstance(stage, torch.nn.Sequential)
              for b in stage]
    assert len(blocks) == 16 and all(torch.equal(b.bn3.weight, torch.ones_like(b.bn3.weight)) for b in blocks)
    timm_init = [b for stage in ResNetBackbone((64, 64), 3, "50", zero_init_last=True).model.children()
                 if isinstance(stage, torch.nn.Sequential) for b in stage]
    assert all(b.bn3.weight.abs().sum() == 0 for b in timm_init)
    cfg = load_config(None, ["method.name=cim", "model.size=pico", "model.img_size=[28,28]", "model.patch_size=4",
                             "method.generator_depth=2", f"tokenizer.path={tiny_tokenizer}"])
    method = build_method(cfg, 1)
    for group, named in method.optim_groups().items():
        optimizer = make_optimizer(named, cfg, 1e-3, GroupOptimConfig(), method.no_weight_decay_keys)
        exempt = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        for name, p in named:
            if name.endswith(("pos_embed", "cls_token")):
                assert id(p) in exempt, name
            elif name.endswith("mask_token") or (p.ndim > 1 and not name.endswith(".bias")):
                assert id(p) not in exempt, name
