"""Reconstruction targets against direct computations."""
import torch

from mimkit.targets import sliding_window_pixels


def test_sliding_window_target_equals_a_direct_per_pixel_computation():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 11, 13)
    window = 8
    fast = sliding_window_pixels(images, window)
    direct = torch.empty_like(images)
    for i in range(11):
        for j in range(13):
            rows = slice(max(0, i - 4), min(11, i + 4))          # offsets -4 .. +3, clipped to the image
            cols = slice(max(0, j - 4), min(13, j + 4))
            patch = images[:, :, rows, cols].flatten(2)
            mean, var = patch.mean(-1), patch.var(-1, unbiased=False)
            direct[:, :, i, j] = (images[:, :, i, j] - mean) / (var + 1e-6) ** 0.5
    assert torch.allclose(fast, direct, atol=1e-4)
    # a constant image has zero variance: the target is 0, not a division by zero
    assert sliding_window_pixels(torch.full((1, 1, 9, 9), 0.7)).abs().max() < 1e-3
