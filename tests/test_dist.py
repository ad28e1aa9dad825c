"""torchrun on CPU (gloo): the same recipe runs with 2 processes, and gradients are averaged."""
import json
import os
import subprocess
import sys

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
