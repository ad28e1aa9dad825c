"""RankMe and the feature spread (eval/rankme.py): hand-computed values, scale invariance, the collapse warning, and
`--online-probe rankme` logging them without labels."""
import json

import pytest
import torch

from mimkit.cli import main
from mimkit.eval.rankme import collapse_warning, feature_spread, rankme
from tests.conftest import REPO


def with_singular_values(values, n=50, d=20, seed=0):
    """A [n, d] matrix whose singular values are `values` (the rest 0)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = torch.zeros(n, d, dtype=torch.float64)
    s[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return u @ s @ v.T


@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_k_equal_singular_values_give_rank_k(k):
    assert rankme(with_singular_values([2.5] * k)) == pytest.approx(k, abs=1e-4)


def test_rankme_by_hand_and_invariant_to_scale():
    z = with_singular_values([3.0, 1.0])                 # p = (0.75, 0.25): exp(H) = 1 / (0.75^0.75 0.25^0.25)
    assert rankme(z) == pytest.approx(1 / (0.75 ** 0.75 * 0.25 ** 0.25), abs=1e-5)
    assert rankme(1000 * z) == pytest.approx(rankme(z), abs=1e-6) and rankme(z / 1000) == pytest.approx(rankme(z), abs=1e-6)
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    assert feature_spread(7 * features) == pytest.approx(feature_spread(features), abs=1e-9)
    assert 0.8 < feature_spread(features) < 1.1


def test_a_constant_encoder_has_rank_1_no_spread_and_is_warned_about():
    constant = torch.ones(100, 32) * torch.linspace(-1, 1, 32)           # all features equal, uncentred
    assert rankme(constant) == pytest.approx(1.0, abs=1e-4) and feature_spread(constant) == pytest.approx(0, abs=1e-6)
    assert "collapsed (centred RankMe 1.0" in collapse_warning(constant)
    healthy = torch.randn(100, 32, generator=torch.Generator().manual_seed(2))
    assert collapse_warning(healthy) is None
    offset = healthy + 200 * torch.linspace(-1, 1, 32)        # one mean direction dominates, the images still differ
    assert rankme(offset) < 2 and collapse_warning(offset) is None


def test_the_online_rankme_probe_needs_no_labels(tmp_path, fmnist_small, capsys):
    """On Fashion-MNIST written as a flat folder of PNGs (no labels, no test split), `--online-probe rankme` logs
    probe/rankme and probe/feature_spread before the first step and at the probe cadence."""
    from PIL import Image

    from mimkit.data.datasets import read_idx
    images = read_idx(fmnist_small / "train-images-idx3-ubyte.gz")[:600]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(flat / f"{i:04d}.png")
    assert main(["pretrain", "--config", str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml"), "--data", f"folder:{flat}",
                 "--out", str(tmp_path / "run"), "--steps", "20", "--online-probe", "rankme", "--device", "cpu",
                 "train.probe_every=10", "train.probe_test=200", "data.num_workers=0", "train.sample_every=0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "probe/rankme" in r]
    assert [r["step"] for r in probes] == [0, 10, 20]
    assert all(1 < r["probe/rankme"] <= 200 and r["probe/feature_spread"] > 0 for r in probes)
    assert "online probe: rankme on 200 images, no labels" in capsys.readouterr().out
