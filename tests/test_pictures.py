"""Pictures explain themselves: titles drawn beside (never over) the tiles, a column title over every attention
column, loss curves with one panel per logged loss."""
import numpy as np
import timm
import torch
from PIL import Image

from mimkit.engine.logging import save_loss_curves, save_rows_grid, save_titled_grid
from mimkit.eval.attention import save_attention_grid


def dark(region: np.ndarray) -> int:
    return int((region.max(axis=-1) < 100).sum())


def test_rows_grid_draws_title_and_row_titles_beside_untouched_tiles(tmp_path):
    values = torch.linspace(0.3, 0.9, 12)
    tiles = values.view(12, 1, 1, 1).expand(12, 1, 28, 28)
    rows = [("original", tiles[:4]), ("masked", tiles[4:8]), ("reconstruction", tiles[8:])]
    zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    save_rows_grid(rows, zero, one, tmp_path / "titled.png", title="run-a (mae), step 100")
    save_titled_grid(tiles, 4, tmp_path / "bare.png")
    titled, bare = (np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("titled", "bare"))
    top, left = titled.shape[0] - bare.shape[0], titled.shape[1] - bare.shape[1]
    assert top > 10 and left > 40
    assert np.array_equal(titled[top:, left:], bare)                      # the tiles are exactly the data
    assert dark(titled[:top]) > 20                                        # the title
    tile = 84 + 2
    for i in range(3):                                                    # one row title per row, in its band
        assert dark(titled[top + i * tile: top + (i + 1) * tile, :left]) > 20
    save_rows_grid(rows[::-1], zero, one, tmp_path / "other.png", title="run-a (mae), step 100")
    other = np.asarray(Image.open(tmp_path / "other.png").convert("RGB"))
    assert not np.array_equal(other[top:top + tile, :left], titled[top:top + tile, :left])


def test_attention_grid_titles_every_column(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=0,
                            depth=1, embed_dim=32, num_heads=4).eval()
    heads = vit.blocks[-1].attn.num_heads
    x = torch.rand(2, 1, 28, 28)
    save_attention_grid(vit, x, x, (7, 7), tmp_path / "attention.png", title="run-a: last-layer CLS attention")
    image = np.asarray(Image.open(tmp_path / "attention.png").convert("RGB"))
    tile = 84 + 2
    columns = (image.shape[1] - 2) // tile
    assert columns == heads + 2                                           # image | mean | one per head
    header = image[:image.shape[0] - 2 * tile - 2]
    for j in range(columns):
        assert dark(header[-18:, 2 + j * tile: 2 + (j + 1) * tile]) > 5, j  # "image", "mean", "head 1", ...


def test_loss_curves_have_one_panel_per_logged_loss(tmp_path):
    rows = [{"step": 10 * i, "loss": 1 / (i + 1), "loss_disc": 0.5, "lr": 1e-3} for i in range(5)]
    one = save_loss_curves([{k: r[k] for k in ("step", "loss")} for r in rows], tmp_path / "one.png")
    two = save_loss_curves(rows, tmp_path / "two.png", title="run-a")
    assert Image.open(two).width > 1.5 * Image.open(one).width           # loss and loss_disc, not lr
    assert save_loss_curves(rows[:1], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
