import torch

from mimkit.eval import knn_top1, linear_probe_top1


def test_knn_hand_example():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_top1(train, labels, test, torch.tensor([0, 1]), k=2) == 100.0
    assert knn_top1(train, labels, test, torch.tensor([1, 0]), k=2, vote="majority") == 0.0


def test_knn_weighted_vote_prefers_close_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])   # one very close class-0 point, two class-1
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.01]])
    assert knn_top1(train, labels, test, torch.tensor([0]), k=3, vote="weighted", temperature=0.07) == 100.0
    assert knn_top1(train, labels, test, torch.tensor([0]), k=3, vote="majority") == 0.0


def test_linear_probe_learns_separable_classes_and_fails_on_noise():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 3
    y = torch.randint(0, 4, (800,), generator=gen)
    x = centers[y] + torch.randn(800, 16, generator=gen)
    assert linear_probe_top1(x[:600], y[:600], x[600:], y[600:], epochs=20) > 95
    noise = torch.randn(800, 16, generator=gen)
    assert linear_probe_top1(noise[:600], y[:600], noise[600:], y[600:], epochs=20) < 45
