"""Keyed draws (train.randomness=keyed): an image's mask, sampled tokens, noise and drop path follow from its key,
not from which rank holds it or what else is in its batch."""
import pytest
import torch

from mimkit import keyed_random as draws
from mimkit.generators import sample_replacements
from mimkit.masking import block_mask, random_mask, simmim_mask


LOGITS = torch.randn(8, 5, 11, generator=torch.Generator().manual_seed(0)) * 3   # a generator's output per image


def keys_at(positions, epoch=0, salt=""):
    return draws.sample_keys(7, epoch, torch.as_tensor(positions), salt)


def per_image_draws(positions):
    """Every keyed sampler of a training step, for the images at `positions`."""
    b = len(positions)
    with draws.keyed(keys_at(positions)):
        return {"random": random_mask(b, (7, 7), 0.75, "cpu"),
                "block": block_mask(b, (14, 14), 0.4, "cpu", min_block=4),
                "simmim": simmim_mask(b, (8, 8), 0.6, 8, (4, 4), "cpu"),
                "tokens": sample_replacements(LOGITS[list(positions)]),
                "uniform_tokens": sample_replacements(torch.zeros(b, 5, 11), "uniform"),
                "normal": draws.randn(b, 3, 4),
                "ints": draws.randint(9, b, 6)}


def test_an_image_draws_the_same_whichever_batch_or_rank_holds_it():
    """World 1 holds places 0..7 in one batch; world 2's rank 1 holds places 1, 3, 5, 7 (ResumableSampler's deal):
    each image's draws are equal in both, and different images draw differently."""
    whole = per_image_draws(range(8))
    rank1 = per_image_draws(range(1, 8, 2))
    for name, value in whole.items():
        assert torch.equal(value[1::2], rank1[name]), name
        assert not torch.equal(value[0], value[1]), name
    assert whole["random"].sum(1).eq(37).all() and whole["simmim"].sum(1).eq(40).all()   # counts still exact
    assert whole["block"].sum(1).eq(round(196 * 0.4)).all()


def test_keys_differ_by_epoch_stage_and_place_and_draws_by_their_order():
    assert len(set(keys_at(range(1000)).tolist())) == 1000
    assert not torch.equal(keys_at([5], epoch=1), keys_at([5])) and not torch.equal(keys_at([5], salt="d"), keys_at([5]))
    with draws.keyed(keys_at([0, 1])):
        first, second = draws.rand(2, 4), draws.rand(2, 4)
    with draws.keyed(keys_at([0, 1])):
        again = draws.rand(2, 4)
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_keyed_draws_have_the_right_distributions():
    with draws.keyed(keys_at(range(64))):
        u, n = draws.rand(64, 4096), draws.randn(64, 4096)
        ints = draws.randint(5, 64, 4096)
        logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
        samples = draws.categorical(logits.expand(64, 2000, 4))
    assert 0 <= u.min() and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=2e-3) and u.var().item() == pytest.approx(1 / 12, abs=1e-3)
    assert n.mean().item() == pytest.approx(0, abs=5e-3) and n.std().item() == pytest.approx(1, abs=5e-3)
    assert torch.bincount(ints.flatten(), minlength=5).div(ints.numel()).sub(0.2).abs().max() < 3e-3
    freq = torch.bincount(samples.flatten(), minlength=4).double() / samples.numel()
    assert torch.allclose(freq, logits.softmax(-1)[0].double(), atol=3e-3), freq   # 128,000 draws: sd < 1.4e-3
    pairs = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert abs(pairs.item()) < 0.01                                              # neighbours independent


def test_outside_a_keyed_block_the_draws_are_torchs_and_a_batch_must_fit_the_keys():
    torch.manual_seed(3)
    a = draws.rand(2, 3)
    torch.manual_seed(3)
    assert torch.equal(a, torch.rand(2, 3))
    with draws.keyed(keys_at(range(4))):
        doubled = draws.rand(8, 2)      # real and generated views of the 4 images, concatenated: one key each
        assert not torch.equal(doubled[:4], doubled[4:])
        with pytest.raises(ValueError, match="a keyed draw for 6 images inside a block keyed for 4"):
            draws.rand(6)


def test_keyed_drop_path_replaces_timms_and_drops_per_image():
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.5)
    before = model.state_dict()
    assert draws.key_drop_paths(model) == 2 and model.state_dict().keys() == before.keys()
    layer = model.blocks[1].drop_path1
    assert isinstance(layer, draws.KeyedDropPath) and layer.drop_prob == pytest.approx(0.5)
    x = torch.ones(8, 3, 2)
    with draws.keyed(keys_at(range(8))):
        out = layer(x)
    kept = out[:, 0, 0]
    assert set(kept.tolist()) <= {0.0, 2.0} and 0 < kept.count_nonzero() < 8                 # survivors scaled by 1/keep
    with draws.keyed(keys_at(range(4, 8))):
        assert torch.equal(layer(x[:4]), out[4:])
    assert torch.equal(layer.eval()(x), x)
