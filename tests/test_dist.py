"""torchrun on CPU (gloo): the same recipe runs with 2 processes, and gradients are averaged."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimkit.engine.checkpoint import load_checkpoint
from tests.conftest import REPO


def _average_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from mimkit.engine.dist import average_gradients
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)),
              torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.full((3,), float(rank + 1))
    params[1].grad = torch.full((2, 2), float(10 * rank))   # params[2] has no gradient on any rank
    average_gradients(params, 2)
    torch.save([p.grad for p in params[:2]], f"{out_dir}/grads{rank}.pt")
    dist.destroy_process_group()


def test_average_gradients_across_two_ranks(tmp_path):
    mp.spawn(_average_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        g = torch.load(tmp_path / f"grads{rank}.pt")
        assert torch.allclose(g[0], torch.full((3,), 1.5)) and torch.allclose(g[1], torch.full((2, 2), 5.0))


def test_the_slurm_and_gpu_scripts_parse_and_the_slurm_job_resumes_and_requeues():
    for script in ("scripts/slurm.sbatch", "benchmarks/gpu_suite.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    text = (REPO / "scripts/slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "scontrol requeue" in text and "trap requeue USR1" in text
    launch = text[text.index("srun"):]
    assert "--rdzv-backend=c10d" in launch and "--max-restarts" in launch and "pretrain" in launch
    assert "--resume" in launch


PICO = ["--device", "cpu", "model.size=pico", "data.num_workers=0", "train.log_every=1", "optim.clip_grad=1.0",
        "model.drop_path=0.1", "train.ckpt_every=5", "train.keep_every=5"]
PICO_MAE = ["--config", str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml"), *PICO, "method.decoder_dim=32",
            "method.decoder_depth=1"]


def _pretrain_argv(out, steps, world, *extra):
    """A pretrain command line at `world` processes with the global batch 32 (16 per rank at world 2)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", "29519",
                "-m", "mimkit.cli"] if world > 1 else [sys.executable, "-m", "mimkit.cli"]
    return launcher + ["pretrain", "--out", str(out), "--steps", str(steps), *extra,
                       f"data.batch_size={32 // world}"]


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (read from /proc), as a node lost to preemption."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finished(argv):
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses_and_weights(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], load_checkpoint(out / "last.pt" if (out / "last.pt").exists() else out)


def _same_run(losses, ckpt, ref_losses, ref):
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert ckpt["model"].keys() == ref["model"].keys()
    for key, value in ref["model"].items():
        assert torch.allclose(ckpt["model"][key], value, atol=1e-5), key


def test_a_run_is_the_same_run_at_world_1_and_2_under_ddp_and_fsdp_and_across_a_kill(tmp_path, fmnist_small):
    """Keyed draws (masks and drop path from each image's place in the global order) make MAE at world 2 (16 images
    per rank) the world-1 run at the same global batch of 32. A world-2 fsdp run (activation checkpointing, blocks
    kept gathered, DCP checkpoints, pictures) killed with SIGKILL after step 7 resumes from its sharded step-5
    directory at world 1 (resharded as read): its steps 1-5 (world 2) and 6-10 (world 1) log the uninterrupted
    world-1 losses and end with its weights, to 1e-5. The world-1 run's step-5 checkpoint, continued at world 2
    under ddp, does too."""
    data = ["--data", f"idx:{fmnist_small}", *PICO_MAE]
    _finished(_pretrain_argv(tmp_path / "ref", 10, 1, *data))
    ref_losses, ref = _losses_and_weights(tmp_path / "ref")
    assert len(ref_losses) == 10

    killed = tmp_path / "killed"
    argv = _pretrain_argv(killed, 10, 2, *data, "train.parallel=fsdp", "train.checkpoint=dcp", "train.sample_every=5",
                          "train.activation_checkpointing=true", "train.reshard_after_forward=false")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = (killed / "metrics.jsonl").read_text().splitlines() if (killed / "metrics.jsonl").exists() else []
        if len(rows) >= 7:
            break
        time.sleep(0.05)
    _kill_tree(proc.pid)                                   # torchrun and its workers (each in its own session)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the world-2 run ended before it could be killed"
    saved = load_checkpoint(killed)
    assert saved["step"] == 5 and saved["world_size"] == 2 and saved["checkpoint"] == "dcp"
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["cpu"], saved["rng"][1]["cpu"])
    assert len(list((killed / "checkpoints/step-0000005").glob("*.distcp"))) == 2       # one file of shards per rank
    assert (killed / "samples" / "step-0000005.png").is_file()
    first = json.loads((killed / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == round(1 / (2048 // 2 // 16), 4)                         # global batch 32 = 2 ranks x 16
    time.sleep(1)
    assert load_checkpoint(killed)["step"] == 5                                   # no worker went on after the kill
    resumed = _finished(_pretrain_argv(killed, 10, 1, "--resume", "--device", "cpu"))
    assert "from step 5" in resumed.stdout and "global batch 32" in resumed.stdout
    _same_run(*_losses_and_weights(killed), ref_losses, ref)

    grown = tmp_path / "grown"           # the world-1 run's step-5 checkpoint, continued at world 2 under ddp
    grown.mkdir()
    shutil.copy(tmp_path / "ref" / "checkpoint-0000005.pt", grown / "last.pt")
    shutil.copy(tmp_path / "ref" / "config.yaml", grown / "config.yaml")
    rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[:5]
    (grown / "metrics.jsonl").write_text("".join(row + "\n" for row in rows))
    _finished(_pretrain_argv(grown, 10, 2, "--resume", "--device", "cpu"))
    _same_run(*_losses_and_weights(grown), ref_losses, ref)


def test_gan_mae_with_its_shared_backbone_is_the_same_run_at_world_1_and_2_under_ddp_and_fsdp(tmp_path, fmnist_small):
    """GAN-MAE (two stages, one backbone shared by generator and discriminator, D called with detached weights for
    L_adv) at world 2 under ddp and fsdp equals the world-1 run at the same global batch: every stage's losses, the
    online k-NN probe (under fsdp: gathered, probed by rank 0) and the final weights, to 1e-5 over 10 steps."""
    data = ["--data", f"idx:{fmnist_small}", *PICO_MAE, "method.name=gan_mae", "method.decoder_heads=2",
            "train.online_probe=knn", "train.probe_every=5", "train.probe_train=300", "train.probe_test=200"]
    _finished(_pretrain_argv(tmp_path / "one", 10, 1, *data))
    _finished(_pretrain_argv(tmp_path / "ddp", 10, 2, *data))
    _finished(_pretrain_argv(tmp_path / "fsdp", 10, 2, *data, "train.parallel=fsdp"))
    rows = {}
    for name in ("one", "ddp", "fsdp"):
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    keys = {k for row in rows["one"] for k in row if "loss" in k or k.startswith("discriminator/acc")
            or k == "probe/knn_top1"}
    assert {"generator/loss_adv", "discriminator/loss", "probe/knn_top1"} <= keys
    assert [r["step"] for r in rows["one"] if "probe/knn_top1" in r] == [0, 5, 10]
    for other in ("ddp", "fsdp"):
        for a, b in zip(rows["one"], rows[other], strict=True):
            for key in keys & a.keys():
                assert b[key] == pytest.approx(a[key], abs=1e-5), (other, a["step"], key)
        _same_run(*_losses_and_weights(tmp_path / other), *_losses_and_weights(tmp_path / "one"))


def test_cim_with_a_frozen_tokenizer_and_shared_layers_is_the_same_run_under_fsdp_at_world_2(tmp_path, fmnist_small,
                                                                                             tiny_tokenizer):
    """CIM with a frozen d-VAE tokenizer and layers shared by generator and enhancer (one fsdp unit): fsdp at world 2
    equals world 1; the tokenizer is in no optimiser state and no checkpoint weight (it is reloaded from its file).
    (CAE's token run under fsdp at world 2: the next test.)"""
    for recipe in ("cim-respix_vit-mini_fmnist-tiny.yaml",):
        data = ["--data", f"idx:{fmnist_small}", "--config", str(REPO / "configs" / recipe), *PICO,
                f"tokenizer.path={tiny_tokenizer}"]
        one, two = tmp_path / recipe / "one", tmp_path / recipe / "two"
        _finished(_pretrain_argv(one, 4, 1, *data))
        _finished(_pretrain_argv(two, 4, 2, *data, "train.parallel=fsdp"))
        losses, ckpt = _losses_and_weights(two)
        _same_run(losses, ckpt, *_losses_and_weights(one))
        assert "tokenizer" in ckpt["frozen"] and not [k for k in ckpt["model"] if k.startswith("tokenizer.")]
        named = [n for state in ckpt["optimizers"].values() for n in state["state"]]
        assert named and not [n for n in named if n.startswith("tokenizer.")], recipe


def _frozen_tokenizer_worker(rank: int, init_file: str, tokenizer: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mimkit.config import load_config
    from mimkit.engine.parallel import shard_method
    from mimkit.methods import build_method
    torch.manual_seed(0)
    method = build_method(load_config(REPO / "configs/cae_vit-mini_fmnist-tiny.yaml",
                                      ["model.size=pico", f"tokenizer.path={tokenizer}"]), 1)
    method.load_initial_weights()
    method.set_pixel_stats(torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.35))
    before = {k: v.clone() for k, v in method.tokenizer.state_dict().items()}
    shard_method(method)
    method(torch.randn(4, 1, 28, 28))["loss"].backward()
    grads = {n: p.grad is not None for n, p in method.named_parameters()}
    trained = {id(p) for named in method.optim_groups().values() for _, p in named}
    in_optimiser = [n for n, p in method.named_parameters() if n.startswith("tokenizer.") and id(p) in trained]
    after = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True))
    unchanged = all(torch.equal(after[f"tokenizer.{k}"], v) for k, v in before.items())
    torch.save({"grads": grads, "in_optimiser": in_optimiser, "unchanged": unchanged}, f"{out_dir}/frozen{rank}.pt")
    dist.destroy_process_group()


def test_a_frozen_tokenizer_under_fsdp_gets_no_gradient_and_no_optimiser_state(tmp_path, tiny_tokenizer):
    """CAE's token run sharded at world 2: a forward and backward leave the d-VAE without gradients, outside the
    optimiser groups and unchanged, while the encoder gets its gradients."""
    mp.spawn(_frozen_tokenizer_worker, args=(str(tmp_path / "init"), str(tiny_tokenizer), str(tmp_path)), nprocs=2)
    for rank in range(2):
        found = torch.load(tmp_path / f"frozen{rank}.pt")
        tokenizer = {n: g for n, g in found["grads"].items() if n.startswith("tokenizer.")}
        assert tokenizer and not any(tokenizer.values())
        assert any(g for n, g in found["grads"].items() if n.startswith("encoder."))     # the rest did train
        assert found["in_optimiser"] == [] and found["unchanged"]


def test_train_parallel_takes_ddp_or_fsdp_for_every_method():
    from mimkit.config import ConfigError, load_config
    for recipe in ("vision-electra_vit-mini_fmnist-tiny.yaml", "perceptual-mae-lsgan-p_vit-mini_fmnist-tiny.yaml"):
        assert load_config(REPO / "configs" / recipe, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="train.parallel='zero3' is out of range: it must be ddp or fsdp"):
        load_config(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml", ["train.parallel=zero3"])


def test_optimiser_state_is_stored_by_name_and_a_positional_one_still_loads():
    """Run checkpoints keep optimiser state by parameter name (so ddp and fsdp runs resume under either); one written
    by position (before) loads the same; an optimiser that has not stepped is stored empty and stays so (DCP's getter
    would step it with zero gradients to make state)."""
    import copy
    from mimkit.engine.parallel import full_state, load_optimizers

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
        groups = [{"params": [model[0].bias, model[1].weight]}, {"params": [model[0].weight, model[1].bias]}]
        return model, torch.optim.AdamW(groups, lr=0.1), torch.optim.AdamW(model[1].parameters())
    model, opt, idle = build()
    model(torch.randn(4, 2)).square().sum().backward()
    opt.step()
    weights, states = full_state(model, {"g": opt, "idle": idle})
    assert set(states["g"]["state"]) == {"0.bias", "1.weight", "0.weight", "1.bias"}
    assert states["g"]["param_groups"][1]["params"] == ["0.weight", "1.bias"]
    assert states["idle"]["state"] == {} and not idle.state
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for stored in (states["g"], copy.deepcopy(opt.state_dict())):          # by name, and by position
        fresh, fresh_opt, _ = build()
        load_optimizers(fresh, {"g": fresh_opt}, {"g": stored})
        for p, q in zip(model.parameters(), fresh.parameters()):
            assert torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"])


def test_sync_batchnorm_converts_the_trained_batchnorms_and_is_refused_on_cpu_ranks():
    """train.sync_batchnorm turns every BatchNorm of CIM's ResNet enhancer into a SyncBatchNorm holding the same
    weights (at world > 1, on GPUs); a world of one is left alone, and CPU ranks get the fix in one sentence."""
    from mimkit.config import load_config
    from mimkit.engine.parallel import sync_batchnorm
    from mimkit.methods import build_method
    torch.manual_seed(0)
    method = build_method(load_config(REPO / "configs/cim-respix_resnet-mini_fmnist-tiny.yaml",
                                      ["train.sync_batchnorm=true", "method.generator=mae"]), 1)
    norms = {n: m.weight for n, m in method.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(norms) > 10
    assert sync_batchnorm(method, 1, torch.device("cuda")) == 0
    with pytest.raises(ValueError, match="train.sync_batchnorm needs GPUs"):
        sync_batchnorm(method, 2, torch.device("cpu"))
    assert sync_batchnorm(method, 2, torch.device("cuda")) == len(norms)      # converting needs no GPU, syncing does
    synced = dict(method.named_modules())
    for name, weight in norms.items():
        assert isinstance(synced[name], torch.nn.SyncBatchNorm) and synced[name].weight is weight, name
