"""train.activation_checkpointing: the same gradients as without it, fewer tensors kept for the backward, every block
stack of a method wrapped (encoder, decoder, discriminator), and a run that trains with it."""
import copy
import json

import pytest
import torch

from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.engine.activations import checkpoint_blocks
from mimkit.keyed_random import key_drop_paths, keyed, sample_keys
from mimkit.methods import build_method
from tests.conftest import REPO


def saved_and_grads(method, images, seed=1, keys=None):
    """(tensors saved for the backward, their bytes, the loss, the gradients) of one forward/backward (its draws
    keyed by `keys`, as in a training step, when given)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)                       # the same masks, noise and drop path in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), keyed(keys):
        loss = method(images)["loss"]
    loss.backward()
    return len(saved), sum(saved), loss.item(), {n: p.grad.clone() for n, p in method.named_parameters()
                                                  if p.grad is not None}


@pytest.mark.parametrize("keys", [None, sample_keys(0, 3, torch.arange(8))], ids=["torch-rng", "keyed"])
@pytest.mark.parametrize("recipe, blocks", [("mae_vit-mini_fmnist-tiny.yaml", 6 + 2),          # encoder + decoder
                                            ("vision-electra_vit-mini_fmnist-tiny.yaml", 6 + 2 + 6)])  # + discriminator
def test_checkpointed_blocks_give_the_same_gradients_and_keep_fewer_activations(recipe, blocks, keys):
    """Drop path's coins are replayed in the recomputation: torch's RNG state, or the keyed draws' keys and counter
    (the recomputation runs in the backward, outside the step's keyed block)."""
    cfg = load_config(REPO / "configs" / recipe, ["model.drop_path=0.5"])
    torch.manual_seed(0)
    plain = build_method(cfg, 1).train()
    if keys is not None:
        assert key_drop_paths(plain) > 0
    wrapped = copy.deepcopy(plain)
    assert checkpoint_blocks(wrapped, True) == blocks
    images = torch.randn(8, 1, 28, 28)
    count_plain, bytes_plain, loss_plain, grads_plain = saved_and_grads(plain, images, keys=keys)
    count_wrapped, bytes_wrapped, loss_wrapped, grads_wrapped = saved_and_grads(wrapped, images, seed=2, keys=keys) \
        if keys is not None else saved_and_grads(wrapped, images)
    assert loss_wrapped == pytest.approx(loss_plain, abs=1e-6)
    assert grads_wrapped.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_wrapped[name], grad, atol=1e-6, rtol=0), name
    assert count_wrapped < count_plain / 2 and bytes_wrapped < bytes_plain / 2, (count_plain, count_wrapped,
                                                                              bytes_plain, bytes_wrapped)
    assert wrapped.state_dict().keys() == plain.state_dict().keys()         # checkpoints and exports unchanged


def test_a_number_wraps_the_first_blocks_of_each_stack_and_no_block_twice():
    torch.manual_seed(0)
    method = build_method(load_config(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml"), 1)
    assert checkpoint_blocks(method, 1) == 2                                  # encoder block 1, decoder block 1
    assert checkpoint_blocks(method, True) == 6                               # the other 5 + 1, not those again
    with torch.no_grad():                                                    # no graph: the plain forward
        method(torch.randn(2, 1, 28, 28))


def test_a_run_trains_with_activation_checkpointing_and_the_value_is_checked(tmp_path, fmnist_small, capsys):
    argv = ["pretrain", "--config", str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml"), "--data", f"idx:{fmnist_small}",
            "--steps", "3", "data.batch_size=16", "data.num_workers=0", "train.sample_every=0", "train.log_every=1"]
    assert main(argv + ["--out", str(tmp_path / "a"), "train.activation_checkpointing=true"]) == 0
    assert "activation checkpointing: 8 blocks" in capsys.readouterr().out
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("a", "b")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_config(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml", ["train.activation_checkpointing=0"])


def test_the_memory_estimate_counts_states_by_hand_and_activations_with_and_without_checkpointing():
    from mimkit.engine.cost import memory_estimate
    cfg = load_config(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml")
    torch.manual_seed(0)
    method = build_method(cfg, 1)
    trained = sum(p.numel() for p in method.parameters() if p.requires_grad)
    everything = sum(p.numel() for p in method.parameters())           # fixed sin-cos tables are frozen parameters
    rows = {(r["parallel"], r["checkpointing"]): r for r in memory_estimate(cfg, method, 1, batch=64, world=4)}
    ddp, fsdp = rows[("ddp", False)], rows[("fsdp x4", False)]
    assert ddp["parameters"] == pytest.approx(4 * everything / 2 ** 30)
    assert ddp["optimizer"] == pytest.approx(8 * trained / 2 ** 30) and trained < everything
    assert fsdp["gradients"] == pytest.approx(ddp["gradients"] / 4) and fsdp["activations"] == ddp["activations"]
    assert 0 < rows[("ddp", True)]["activations"] < ddp["activations"] / 2
    assert ddp["total"] == pytest.approx(sum(ddp[k] for k in ("parameters", "gradients", "optimizer", "activations")))


def test_bench_prints_the_memory_table_and_times_checkpointed_steps(capsys):
    recipe = str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml")
    assert main(["bench", "--config", recipe, "--batch", "4", "--steps", "1", "--warmup", "0", "--modes",
                 "eager,checkpointed", "--world", "2", "model.size=pico"]) == 0
    out = capsys.readouterr().out
    assert "| fsdp x2 | yes |" in out and "| ddp | no |" in out and "| checkpointed |" in out and "| eager |" in out
    assert main(["bench", "--config", recipe, "--batch", "4", "--modes", "none", "model.size=pico"]) == 0
    out = capsys.readouterr().out
    assert "| fsdp x8 | no |" in out and "| eager |" not in out and "images/s" not in out     # no empty timing table
