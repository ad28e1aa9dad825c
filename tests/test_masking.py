import torch

from mimkit.masking import block_mask, gather_tokens, random_mask, scatter_tokens, simmim_mask, visible_indices


def test_random_mask_exact_count_and_independent_rows():
    torch.manual_seed(0)
    mask = random_mask(64, (7, 7), 0.75, "cpu")
    assert mask.dtype == torch.bool and mask.shape == (64, 49)
    assert mask.sum(1).eq(37).all()                      # round(49 * 0.75)
    assert len({tuple(r.tolist()) for r in mask}) == 64  # every image gets its own mask
    freq = random_mask(4000, (7, 7), 0.75, "cpu").float().mean(0)
    assert (freq - 0.755).abs().max() < 0.05            # uniform over positions


def test_simmim_mask_is_coarse_grid_upsampled():
    torch.manual_seed(0)
    mask = simmim_mask(16, (8, 8), 0.6, mask_patch_px=8, model_patch_px=(4, 4), device="cpu")
    grid = mask.reshape(16, 8, 8)
    assert torch.equal(grid[:, 0::2, 0::2], grid[:, 1::2, 1::2])   # 2x2 patch blocks share one value
    assert torch.equal(grid[:, 0::2, 0::2], grid[:, 0::2, 1::2])
    assert mask.sum(1).eq(4 * round(16 * 0.6)).all()


def test_block_mask_exact_count_and_blocky():
    torch.manual_seed(0)
    mask = block_mask(32, (14, 14), 0.5, "cpu")
    assert mask.sum(1).eq(98).all()
    grid = mask.reshape(32, 14, 14).float()
    same_right = (grid[:, :, 1:] == grid[:, :, :-1]).float().mean()
    rand = random_mask(32, (14, 14), 0.5, "cpu").reshape(32, 14, 14).float()
    assert same_right > (rand[:, :, 1:] == rand[:, :, :-1]).float().mean() + 0.15  # contiguous blocks


def test_visible_indices_gather_scatter_roundtrip():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    ids = visible_indices(mask, 2)
    assert ids.tolist() == [[1, 3], [0, 1]]
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    visible = gather_tokens(tokens, ids)
    full = scatter_tokens(visible, ids, torch.full((3,), -1.0), 4)
    assert torch.equal(full[~mask], tokens[~mask]) and full[mask].eq(-1).all()


def test_mae_masks_as_many_patches_as_the_official_code():
    """Official MAE keeps int(L * (1 - ratio)) patches: 52 of 64 masked at 0.8, 177 of 196 at 0.9."""
    from mimkit.masking import num_masked
    assert num_masked(64, 0.8) == 52 and num_masked(196, 0.9) == 177 and num_masked(196, 0.75) == 147
    assert random_mask(3, (8, 8), 0.8, "cpu").sum(1).tolist() == [52, 52, 52]


def test_simmim_masks_ceil_of_ratio_times_mask_patches():
    """SimMIM's MaskGenerator: ceil(token_count * ratio) = 30 of 49 at 0.6 (round would give 29)."""
    mask = simmim_mask(4, (7, 7), 0.6, mask_patch_px=4, model_patch_px=(4, 4), device="cpu")
    assert mask.sum(1).tolist() == [30] * 4


def test_mae_encoder_rejects_a_mask_with_another_count():
    """A mask made elsewhere (e.g. by the official code at another rounding) must not leak masked patches."""
    import pytest
    from mimkit.config import load_config
    from mimkit.methods import build_method
    from tests.conftest import MAE_PICO
    mae = build_method(load_config(None, MAE_PICO + ["method.mask_ratio=0.75"]), 1)
    x = torch.randn(2, 1, 28, 28)
    good = random_mask(2, (7, 7), 0.75, "cpu")
    assert mae.generator(x, good).shape == (2, 49, 16)
    one_more_visible = good.clone()
    one_more_visible[:, good[0].nonzero()[0]] = False
    with pytest.raises(RuntimeError, match="exactly 12 visible patches"):
        mae.generator(x, one_more_visible)
