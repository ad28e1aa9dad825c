"""torchrun on CPU (gloo): the same recipe runs with 2 processes, and gradients are averaged."""
import json
import os
import subprocess
import sys

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


def test_torchrun_two_processes_on_cpu(tmp_path, fmnist_small):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            "-m", "mimkit.cli", "pretrain", "--config", str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml"),
            "--out", str(run), "--data", f"idx:{fmnist_small}", "--device", "cpu",
            "model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1", "data.batch_size=16",
            "data.num_workers=0", "train.log_every=1", "train.sample_every=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(base + ["--steps", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 3
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])  # ranks draw different masks
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert rows[0]["epoch"] == round(1 / (2048 // 2 // 16), 4)  # global batch 32 = 2 ranks x 16
    resumed = subprocess.run(base + ["--steps", "5", "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(run / "last.pt")["step"] == 5


def test_the_slurm_and_gpu_scripts_parse_and_the_slurm_job_resumes_and_requeues():
    for script in ("scripts/slurm.sbatch", "benchmarks/gpu_suite.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    text = (REPO / "scripts/slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "scontrol requeue" in text and "trap requeue USR1" in text
    launch = text[text.index("srun"):]
    assert "--rdzv-backend=c10d" in launch and "--max-restarts" in launch and "pretrain" in launch
    assert "--resume" in launch


def test_fsdp_at_world_2_equals_the_flat_all_reduce_and_resumes_exactly(tmp_path, fmnist_small):
    """train.parallel=fsdp (FSDP2 over gloo) and ddp at world 2 see the same data and masks (the ranks' RNG streams
    are the same), so their losses and final weights agree, also across a resume; a one-process resume of the fsdp
    run (world 1: no sharding) is refused with the fix."""
    def run(out, steps, *extra):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
                "-m", "mimkit.cli", "pretrain", "--config", str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml"),
                "--out", str(tmp_path / out), "--data", f"idx:{fmnist_small}", "--device", "cpu", "--steps", str(steps),
                "model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1", "data.batch_size=16",
                "data.num_workers=0", "train.log_every=1", "train.sample_every=2", "optim.clip_grad=1.0", "model.drop_path=0.1", *extra]
        done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], load_checkpoint(tmp_path / out / "last.pt")

    # each run is cut at step 3 and resumed to 5 (fsdp's optimiser state restored by parameter name)
    run("fsdp", 3, "train.parallel=fsdp", "train.activation_checkpointing=true")        # composes with fsdp
    run("ddp", 3)
    fsdp_losses, fsdp = run("fsdp", 5, "train.parallel=fsdp", "train.reshard_after_forward=false", "--resume")
    ddp_losses, ddp = run("ddp", 5, "--resume")
    assert fsdp["parallel"] == "fsdp" and ddp["parallel"] == "ddp" and fsdp["model"].keys() == ddp["model"].keys()
    assert len(fsdp_losses) == 5 and fsdp_losses == pytest.approx(ddp_losses, abs=1e-5)
    for key, value in ddp["model"].items():
        assert torch.allclose(fsdp["model"][key], value, atol=1e-5), key
    assert (tmp_path / "fsdp" / "samples" / "step-0000002.png").is_file()
    wrong = subprocess.run([sys.executable, "-m", "mimkit.cli", "pretrain", "--out", str(tmp_path / "fsdp"),
                            "--resume", "--steps", "6", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "written with train.parallel=fsdp" in wrong.stderr, wrong.stderr[-2000:]


def test_fsdp_is_refused_where_it_is_not_built_yet():
    from mimkit.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="built for mae and simmim so far, not vision_electra"):
        load_config(REPO / "configs/vision-electra_vit-mini_fmnist-tiny.yaml", ["train.parallel=fsdp"])
    with pytest.raises(ConfigError, match="online_probe does not run under train.parallel=fsdp"):
        load_config(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml", ["train.parallel=fsdp", "train.online_probe=knn"])
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml", ["train.parallel=zero3"])
