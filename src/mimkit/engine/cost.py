"""What a recipe costs on this device: parameters per part, training FLOPs per image, images/s and peak memory of
eager and compiled steps, and the share of the device's peak they reach (`mimkit bench`).

FLOPs are counted by `torch.utils.flop_counter` over one whole engine step (every stage's forward and backward; the
optimiser's element-wise work is not counted), so they are device-independent and include what hand formulas miss
(e.g. a method's second generator pass or a regulariser's double backward). Images are made on the device, so the
speed is the model's and the engine's, not the data loader's.
"""
from __future__ import annotations

import copy
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mimkit.config import Config

# dense bf16 tensor-core peaks (FLOP/s) of devices whose share of peak is worth printing
DEVICE_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


class _GlobalOnly:
    """FlopCounterMode's per-module tracker hooks every module's backward, which a method's autograd.grad (R1,
    path length) cannot run under; only the total is needed."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def parameter_table(method) -> list[tuple[str, int, bool]]:
    """(part, parameters, trainable): the encoder first, then each other top-level module without the encoder."""
    encoder_ids = {id(p) for p in method.encoder.parameters()}
    rows = [("encoder", sum(p.numel() for p in method.encoder.parameters()), True)]
    for name, child in method.named_children():
        params = [p for p in child.parameters() if id(p) not in encoder_ids]
        if params:
            rows.append((name if len(params) == len(list(child.parameters())) else f"{name} (without the encoder)",
                         sum(p.numel() for p in params), any(p.requires_grad for p in params)))
    return rows


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DEVICE_PEAK_BF16.items() if key in name), None)


def _trainer(cfg: Config, out: str, batch: int, compile_model: bool, device: str | None, checkpointed: bool = False):
    from mimkit.engine.trainer import Trainer
    cfg = copy.deepcopy(cfg)
    cfg.data.batch_size, cfg.train.accum_steps, cfg.train.compile = batch, 1, compile_model
    cfg.train.activation_checkpointing = checkpointed or cfg.train.activation_checkpointing
    cfg.train.sample_every, cfg.data.num_workers, cfg.train.online_probe = 0, 0, None
    c = cfg.data.channels or 3
    cfg.data.spec = f"synthetic:{c}x{cfg.model.img_size[0]}x{cfg.model.img_size[1]}"
    return Trainer(cfg, out, quiet=True, device=device)


def total_flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts the total only (and so also runs where a method calls autograd.grad)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def flops_per_image(cfg: Config, in_chans: int, batch: int = 2, step: int | None = None, method=None,
                    epoch: int = 1) -> float:
    """Training FLOPs per image of the recipe's method (every stage the schedule runs: forward and backward), counted
    on the CPU with random images; no data, optimiser or trainer needed. Without `step`: the mean over the method's
    schedule (`Method.cost_points`: Perceptual MAE's term on half the epochs, lazy R1 and path length, GAN-MAE's and
    CIM's two phases); with `step` (and `epoch`), that one step."""
    from mimkit.methods import build_method
    method = method or build_method(cfg, in_chans)
    method.set_pixel_stats(torch.zeros(1, in_chans, 1, 1), torch.ones(1, in_chans, 1, 1))
    images = torch.randn(batch, in_chans, *cfg.model.img_size)
    total = 10 ** 7
    points = [(step, epoch, 1.0)] if step is not None else method.cost_points(total)
    flops = 0.0
    for at, at_epoch, weight in points:
        carry = {"step": at, "epoch": at_epoch, "total_steps": total, "last_micro": True}
        counter = total_flop_counter()
        with counter:
            for stage in method.schedule(at, at_epoch, total):
                method(images, stage.name, carry)["loss"].backward()
        flops += weight * counter.get_total_flops() / batch
    return flops


def saved_activation_bytes(cfg: Config, in_chans: int, batch: int = 2, checkpointed: bool = False,
                           method=None) -> float:
    """Bytes per image the autograd graph keeps for the backward (fp32), the largest over the method's stages at its
    first step, counted with saved-tensor hooks on the CPU; `checkpointed`: with every block stack wrapped
    (engine/activations.py). Under bf16 autocast most of them are half as large."""
    from mimkit.engine.activations import checkpoint_blocks
    from mimkit.methods import build_method
    method = copy.deepcopy(method) if method is not None else build_method(cfg, in_chans)
    if checkpointed:
        checkpoint_blocks(method, True)
    method.set_pixel_stats(torch.zeros(1, in_chans, 1, 1), torch.ones(1, in_chans, 1, 1))
    images = torch.randn(batch, in_chans, *cfg.model.img_size)
    carry = {"step": 0, "epoch": 0, "total_steps": 10 ** 7, "last_micro": True}
    weights = {t.untyped_storage().data_ptr() for t in [*method.parameters(), *method.buffers()]}
    largest = 0
    for stage in method.schedule(0, 0, 10 ** 7):
        kept = {}             # by storage: a tensor saved by several operations, or its views, is held once

        def keep(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:      # weights saved for the backward are the parameters
                kept[storage.data_ptr()] = storage.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            method(images, stage.name, carry)
        largest = max(largest, sum(kept.values()))
    return largest / batch


def memory_estimate(cfg: Config, method, in_chans: int, batch: int, world: int) -> list[dict]:
    """Per-rank memory (GiB) of parameters, gradients, AdamW state and activations, under ddp (every rank holds all)
    and fsdp over `world` ranks (trained parameters, their gradients and optimiser state sharded; frozen parts
    whole), each without and with activation checkpointing. fp32 parameters and state; activations in fp32 at
    `batch` images per rank; FSDP's gathered block and communication buffers are not counted."""
    trained = sum(p.numel() for p in method.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in method.parameters() if not p.requires_grad)
    activations = {ac: batch * saved_activation_bytes(cfg, in_chans, method=method, checkpointed=ac)
                   for ac in (False, True)}
    rows = []
    for parallel, share in (("ddp", 1), (f"fsdp x{world}", world)):
        for ac in (False, True):
            parts = {"parameters": 4 * (trained / share + frozen), "gradients": 4 * trained / share,
                     "optimizer": 8 * trained / share, "activations": activations[ac]}
            rows.append({"parallel": parallel, "checkpointing": ac, **{k: v / 2 ** 30 for k, v in parts.items()},
                         "total": sum(parts.values()) / 2 ** 30})
    return rows


def measure(cfg: Config, batch: int, steps: int = 10, warmup: int = 3, modes=("eager", "compiled"),
            device: str | None = None, flop_batch: int = 2, world: int = 8) -> dict:
    """{'parts': parameter rows, 'flops_per_image', 'device', 'peak', 'memory': `memory_estimate` rows, 'modes':
    [{mode, img_per_s, step_ms, peak_gib, warmup_s, tflops, share_of_peak}]}. Modes: eager, compiled, checkpointed
    (eager with activation checkpointing)."""
    from mimkit.engine.dist import default_device
    from mimkit.methods import build_method
    in_chans = cfg.data.channels or 3          # as the synthetic data the timed steps run on
    method = build_method(cfg, in_chans)
    dev = torch.device(default_device(device))
    result: dict = {"modes": [], "parts": parameter_table(method),
                    "flops_per_image": flops_per_image(cfg, in_chans, flop_batch, method=method),
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "peak": peak_flops(dev),
                    "memory": memory_estimate(cfg, method, in_chans, batch, world), "world": world}
    h, w = cfg.model.img_size
    for mode in modes:
        with tempfile.TemporaryDirectory() as out:
            trainer = _trainer(cfg, out, batch, mode == "compiled", device, mode == "checkpointed")
            dev = trainer.device
            images = [torch.randn(batch, trainer.in_chans, h, w, device=dev)]
            step = trainer.warmup_steps
            for scheduler in trainer.schedulers.values():
                scheduler.step_update(step)
            start = time.perf_counter()
            for _ in range(warmup):
                trainer._step(images, {}, {}, step)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                trainer._step(images, {}, {}, step)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            elapsed = time.perf_counter() - start
            img_s = steps * batch / elapsed
            achieved = img_s * result["flops_per_image"]
            result["modes"].append({
                "mode": mode, "img_per_s": img_s, "step_ms": 1000 * elapsed / steps, "warmup_s": first,
                "peak_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None,
                "tflops": achieved / 1e12, "share_of_peak": achieved / result["peak"] if result["peak"] else None})
    return result


def format_table(name: str, batch: int, result: dict) -> str:
    lines = [f"# {name}: {result['device']}, batch {batch}, torch {torch.__version__}",
             "", "| part | parameters | trained |", "|---|---|---|"]
    lines += [f"| {part} | {count / 1e6:.2f}M | {'yes' if trained else 'frozen'} |"
              for part, count, trained in result["parts"]]
    lines += ["", f"training FLOPs per image (forward + backward of every stage): "
                  f"{result['flops_per_image'] / 1e9:.2f} GFLOP"]
    lines += ["", f"estimated memory per rank (GiB; fp32 weights and AdamW state, fp32 activations at batch {batch} "
                  f"per rank; fsdp over {result['world']} ranks):", "",
              "| parallel | activation checkpointing | parameters | gradients | optimizer | activations | total |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['parallel']} | {'yes' if r['checkpointing'] else 'no'} | {r['parameters']:.2f} | "
              f"{r['gradients']:.2f} | {r['optimizer']:.2f} | {r['activations']:.2f} | {r['total']:.2f} |"
              for r in result["memory"]]
    if result["modes"]:                 # --modes none: the estimates only
        lines += ["", "| mode | images/s | step (ms) | achieved TFLOP/s | share of peak | peak memory (GiB) | warm-up (s) |",
                  "|---|---|---|---|---|---|---|"]
    for m in result["modes"]:
        share = f"{100 * m['share_of_peak']:.1f} %" if m["share_of_peak"] is not None else "n/a (peak unknown)"
        memory = f"{m['peak_gib']:.2f}" if m["peak_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {m['mode']} | {m['img_per_s']:.1f} | {m['step_ms']:.1f} | {m['tflops']:.3f} | {share} | "
                     f"{memory} | {m['warmup_s']:.1f} |")
    return "\n".join(lines)
