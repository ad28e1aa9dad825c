import pytest
import torch

from mimkit.patches import mask_to_pixels, patchify, unpatchify


@pytest.mark.parametrize("channels,h,w,p", [(1, 28, 28, 4), (3, 32, 48, 8), (5, 12, 20, 4)])
def test_patchify_roundtrip_any_channels_non_square(channels, h, w, p):
    x = torch.randn(2, channels, h, w)
    patches = patchify(x, p)
    assert patches.shape == (2, (h // p) * (w // p), p * p * channels)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p), channels), x)


def test_patch_order_is_row_major_with_pixels_then_channels():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # C=2, H=4, W=6, p=2
    patches = patchify(x, 2)
    # patch 1 is the top row's second patch: rows 0-1, cols 2-3; pixel (0,0) channel 0 then channel 1
    assert patches[0, 1, :2].tolist() == [x[0, 0, 0, 2].item(), x[0, 1, 0, 2].item()]
    assert patches[0, 3, 0].item() == x[0, 0, 2, 0].item()  # second patch row starts at image row 2


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 30, 28), 4)


def test_mask_to_pixels():
    mask = torch.tensor([[True, False, False, True]])
    pix = mask_to_pixels(mask, 2, (2, 2))
    assert pix.shape == (1, 1, 4, 4)
    assert pix[0, 0, :2, :2].eq(1).all() and pix[0, 0, :2, 2:].eq(0).all() and pix[0, 0, 2:, 2:].eq(1).all()
