"""CIM's small BEiT generator, its sampling modes and REVDET's labels."""
import torch

from mimkit.config import load_config
from mimkit.generators import BEiTGenerator, replaced_token_labels, sample_replacements


def small_beit():
    cfg = load_config(None, ["model.size=pico", "model.img_size=[28,28]", "model.patch_size=4", "model.drop_path=0.2"])
    torch.manual_seed(0)
    return BEiTGenerator(cfg.model, 1, vocab_size=32, depth=2)


def test_small_beit_is_a_vanilla_vit_with_a_mask_embedding():
    gen = small_beit().eval()
    vit = gen.backbone.model
    assert len(vit.blocks) == 2 and gen.backbone.mask_token is not None
    assert vit.pos_embed.requires_grad                                  # learnt 1-D absolute positions
    assert not any("gamma" in n for n, _ in vit.named_parameters())     # no layer scale
    assert all(type(b.drop_path1).__name__ == "Identity" for b in vit.blocks)   # no drop path
    images = torch.rand(2, 1, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, :20] = True
    logits = gen(images, mask)
    assert logits.shape == (2, 49, 32)
    # a masked patch's pixels reach nothing: its embedding is replaced by [MASK]
    changed = images.clone()
    changed[:, :, :4, :4] = 1 - changed[:, :, :4, :4]                    # patch 0 (masked)
    assert torch.allclose(gen(changed, mask), logits, atol=1e-6)
    changed[:, :, 24:, 24:] = 0.0                                        # patch 48 (visible)
    assert not torch.allclose(gen(changed, mask), logits, atol=1e-4)


def test_softmax_sampling_follows_the_predicted_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp(min=1e-12).log().expand(20000, 4)
    ids = sample_replacements(logits, "softmax")
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_argmax_is_deterministic_and_uniform_ignores_the_generator():
    logits = torch.randn(8, 10, 16)
    assert torch.equal(sample_replacements(logits, "argmax"), logits.argmax(-1))
    assert torch.equal(sample_replacements(logits, "argmax"), sample_replacements(logits, "argmax"))
    other = torch.randn(8, 10, 16) * 100
    torch.manual_seed(3)
    a = sample_replacements(logits, "uniform")
    torch.manual_seed(3)
    b = sample_replacements(other, "uniform")
    assert torch.equal(a, b)
    freq = torch.bincount(sample_replacements(torch.zeros(40000, 4), "uniform"), minlength=4).float() / 40000
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.015)


def test_revdet_labels_are_replaced_and_masked():
    golden = torch.tensor([[1, 2, 3, 4, 5]])
    corrupted = torch.tensor([[1, 7, 3, 9, 5]])
    mask = torch.tensor([[True, True, True, False, False]])
    # position 0: masked, sampled == golden -> original; 1: replaced; 2: same -> 0; 3: visible -> 0 even if differing
    assert replaced_token_labels(golden, corrupted, mask).tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]
