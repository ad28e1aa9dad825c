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
