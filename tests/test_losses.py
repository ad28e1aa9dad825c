import pytest
import torch

from mimkit.losses import masked_l1, masked_mse
from mimkit.targets import patch_pixels


def test_masked_mse_hand_values():
    pred = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]]])     # B=1, L=3, 2 values per patch
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    # per patch: 1, 0, 2 -> masked mean (1 + 2) / 2
    assert torch.isclose(masked_mse(pred, target, mask), torch.tensor(1.5))


def test_masked_l1_hand_values():
    pred = torch.ones(1, 2, 2, 2)                                    # C=2, 2x2
    target = torch.zeros(1, 2, 2, 2)
    target[0, 0, 0, 0] = 3.0
    pixel_mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # masked pixel (0,0): |1-3| + |1-0| = 3 over 1 masked pixel and 2 channels -> 1.5
    assert torch.isclose(masked_l1(pred, target, pixel_mask), torch.tensor(1.5), atol=1e-4)


def test_norm_pix_target_standardises_each_patch():
    x = torch.zeros(1, 1, 2, 4)
    x[0, 0, :, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = patch_pixels(x, 2, normalize=True)
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / (torch.tensor([1.0, 2.0, 3.0, 4.0]).var() + 1e-6) ** 0.5
    assert torch.allclose(t[0, 0], expected, atol=1e-5)
    assert torch.allclose(t[0, 1], torch.zeros(4))


def test_gan_losses_against_hand_values():
    import math

    from mimkit.losses import discriminator_loss, generator_loss
    logits, labels = torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    sig = [1 / (1 + math.exp(-v)) for v in logits.tolist()]
    bce = -(math.log(sig[0]) + math.log(1 - sig[1]) + math.log(1 - sig[2]) + math.log(sig[3])) / 4
    assert discriminator_loss(logits, labels, "nonsaturating").item() == pytest.approx(bce, rel=1e-6)
    ls = (0.5 * (2 - 1) ** 2 + 0.5 * (-1) ** 2 + 0.5 * 0.5 ** 2 + 0.5 * (-3 - 1) ** 2) / 4
    assert discriminator_loss(logits, labels, "least_squares").item() == pytest.approx(ls, rel=1e-6)
    hinge = (max(0, 1 - 2) + max(0, 1 - 1) + max(0, 1 + 0.5) + max(0, 1 + 3)) / 4
    assert discriminator_loss(logits, labels, "hinge").item() == pytest.approx(hinge, rel=1e-6)
    fake = torch.tensor([0.3, -2.0])
    assert generator_loss(fake, "nonsaturating").item() == pytest.approx(
        -(math.log(1 / (1 + math.exp(-0.3))) + math.log(1 / (1 + math.exp(2.0)))) / 2, rel=1e-6)
    assert generator_loss(fake, "least_squares").item() == pytest.approx((0.5 * 0.7 ** 2 + 0.5 * 3.0 ** 2) / 2, rel=1e-6)
    assert generator_loss(fake, "hinge").item() == pytest.approx((-0.3 + 2.0) / 2, rel=1e-6)
    weight = torch.tensor([1.0, 0.0, 0.0, 1.0])                  # a weighted mean reads only the weighted elements
    assert discriminator_loss(logits, labels, "hinge", weight=weight).item() == pytest.approx((0 + 4) / 2)
    assert discriminator_loss(logits, labels, "hinge", reduction="none").tolist() == [0.0, 0.0, 1.5, 4.0]
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(fake, "wasserstein")
