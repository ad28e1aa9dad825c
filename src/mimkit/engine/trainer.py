"""The one training loop for every method.

Per step: fetch `accum_steps` micro-batches, then for each stage the method's schedule chooses for this
step and epoch: forward and backward over the micro-batches, average gradients across ranks, clip, and
step that stage's optimisers. Non-finite steps are skipped inside the fused AdamW kernel (no host sync)
and counted. A method with several stages logs each loss part and gradient norm as `STAGE/name`.
"""
from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

import mimkit
from mimkit import keyed_random as draws
from mimkit.config import Config, GroupOptimConfig
from mimkit.data import Augmented, EvalTransform, PretrainTransform, ResumableSampler, build_dataset, to_unit_float
from mimkit.data.batched import (BatchedCrops, EncodedCrops, decode_on_device, encoded_collate, pad_collate,
                                 resized_crops)
from mimkit.data.shards import ShardStream
from mimkit.engine import dist as D
from mimkit.engine.activations import checkpoint_blocks
from mimkit.engine.checkpoint import (DCP_POINTER, CheckpointError, find_resume_checkpoint, frozen_sources, is_run_checkpoint,
                                      load_checkpoint, save_atomic, state_dict_of, verify_frozen_sources)
from mimkit.engine.distributed_checkpoint import DistributedCheckpointer, load_into
from mimkit.engine.logging import MetricsLog, read_metrics, save_loss_curves, save_rows_grid
from mimkit.engine.parallel import full_state, is_sharded, load_optimizers, shard_method, sync_batchnorm, whole
from mimkit.methods import build_method


class TrainingDiverged(RuntimeError):
    pass


def make_optimizer(named_params, cfg: Config, lr: float, group: GroupOptimConfig, no_decay_keys=()) -> torch.optim.AdamW:
    """AdamW, no weight decay on biases and 1-D parameters (norms), as MAE and timm, nor on parameters whose
    name holds one of `no_decay_keys` (SimMIM's list); fused where available."""
    def decays(name, p):
        return p.ndim > 1 and not name.endswith(".bias") and not any(key in name for key in no_decay_keys)
    weight_decay = cfg.optim.weight_decay if group.weight_decay is None else group.weight_decay
    groups = [{"params": [p for n, p in named_params if not decays(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named_params if decays(n, p)], "weight_decay": weight_decay}]
    kwargs = dict(lr=lr, betas=tuple(group.betas or cfg.optim.betas), eps=cfg.optim.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # old torch or an unsupported device: the host checks the guard instead
        return torch.optim.AdamW(groups, **kwargs)


def load_init(method, path: str | Path) -> str:
    """Initialises `method` from a mimkit run, an export, or an official MAE/SimMIM release checkpoint;
    returns the per-module report (raises when a required module would stay at its init)."""
    from mimkit.pretrained import load_parts
    obj = load_checkpoint(path)
    kind = "mimkit run" if is_run_checkpoint(obj) else "checkpoint"
    return load_parts(method.pretrained_parts(state_dict_of(obj)), f"{kind} {path}")


class RunDirError(ValueError):
    """--out can't hold a run (a file, unwritable), with the fix."""


class Trainer:
    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False, init: str | None = None,
                 device: str | None = None, quiet: bool = False):
        self.cfg, self.out = cfg, Path(out_dir)
        self.dist = D.init_distributed(device)
        self.device = self.dist.device
        self.quiet = quiet or not self.dist.is_main
        t = cfg.train

        self.dataset = build_dataset(cfg.data.spec, "train", channels=cfg.data.channels,
                                     max_missing=cfg.data.max_missing, announce=self._print)
        if isinstance(self.dataset, ShardStream):
            self.dataset.shuffle_buffer = cfg.data.shuffle_buffer
        self.in_chans = self.dataset.channels
        self._hold_out(cfg)
        mean = cfg.data.mean or self.dataset.mean
        std = cfg.data.std or self.dataset.std
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise ValueError(f"data.mean/data.std have {len(mean)}/{len(std)} values but the images have "
                             f"{self.in_chans} channels; give one value per channel")
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

        if self.out.exists() and not self.out.is_dir():
            raise RunDirError(f"--out {self.out} is a file; give a directory for the run (it is created if missing)")
        found = find_resume_checkpoint(self.out, warn=self._print) if resume and self.out.is_dir() else None
        resume_from, ckpt = found or (None, None)
        if resume and found is None:
            self._print(f"--resume: {self.out} holds no run yet (no last.pt); starting fresh")
        elif not resume and ((self.out / "last.pt").exists() or (self.out / DCP_POINTER).exists()):
            raise FileExistsError(f"{self.out} already holds a run (last.pt); pass --resume to continue it, "
                                  f"or choose another --out")
        if ckpt is not None:
            if not is_run_checkpoint(ckpt):
                raise CheckpointError(f"{resume_from} is not a mimkit run checkpoint; use --init to start from foreign weights")
            for key, value in list(cfg.method.items()):   # options resolved at the first start ("auto") stay resolved
                if value == "auto" and ckpt["config"]["method"].get(key, "auto") != "auto":
                    cfg.method[key] = ckpt["config"]["method"][key]

        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.method = build_method(cfg, self.in_chans).to(self.device)
        self.method.set_pixel_stats(self.mean, self.std)
        if ckpt is None:
            reports = ([load_init(self.method, init)] if init else []) + self.method.load_initial_weights()
            for report in reports:
                self._print(report)
        else:
            verify_frozen_sources(self.method, ckpt, resume_from)
            if "trainable" in ckpt:   # what an init made trainable (a learnt position table) stays so
                trainable = set(ckpt["trainable"])
                for name, p in self.method.named_parameters():
                    p.requires_grad_(name in trainable)
        D.broadcast_module(self.method)
        if t.sync_batchnorm:
            synced = sync_batchnorm(self.method, self.dist.world_size, self.device)
            self._print(f"sync_batchnorm: {synced} BatchNorm layers compute their statistics over all ranks")
        self.sharded = t.parallel == "fsdp" and self.dist.world_size > 1
        if self.sharded:
            if ckpt is not None and "model" in ckpt:   # whole weights go in before sharding (dcp: after, sharded)
                self.method.load_run_state(ckpt["model"])
            if t.online_probe and self.dist.is_main:   # the probe reads an unsharded copy, refreshed at each probe
                self.probe_encoder = copy.deepcopy(self.method.encoder.model)
                self.probe_prefix = next(f"{n}." for n, m in self.method.named_modules() if m is self.method.encoder.model)
            cuda_bf16 = self.device.type == "cuda" and t.precision in ("auto", "bf16")
            blocks = shard_method(self.method, t.reshard_after_forward, cuda_bf16)
            self._print(f"fsdp: {blocks} blocks and the rest of the method sharded over {self.dist.world_size} ranks")
        self.frozen = frozen_sources(self.method)   # hashed once: a tokenizer file can be large
        for name, source in self.frozen.items():
            if "token_grid" in source:
                (h, w), (gh, gw) = source["input_size"], source["token_grid"]
                self._print(f"{name}: {source['path']} (sha256 {source['sha256'][:12]}), fed {h}x{w} px -> {gh}x{gw} "
                            f"tokens (tokenizer.input_size)")

        self.global_batch = cfg.data.batch_size * t.accum_steps * self.dist.world_size
        self.micro_per_epoch = self._micro_per_epoch()
        self.steps_per_epoch = self.micro_per_epoch // t.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {self.train_count} training images, fewer than one global batch of "
                             f"{self.global_batch}; lower data.batch_size or add images")
        recipe_steps = math.ceil(t.epochs * self.steps_per_epoch)
        self.total_steps = t.steps or recipe_steps
        # train.steps compresses the recipe's schedule: warm-up keeps its share of the run
        warmup = t.warmup_steps if t.warmup_steps is not None else \
            round(cfg.optim.warmup_epochs * self.steps_per_epoch * self.total_steps / max(recipe_steps, 1))
        self.warmup_steps = min(warmup, max(self.total_steps - 1, 0))
        self.recipe_steps = recipe_steps
        self.lr, how = self.learning_rate(cfg.optim, self.global_batch)
        self._print(f"lr {self.lr:.3g} ({how}); global batch {self.global_batch} = {cfg.data.batch_size} per device x "
                    f"{t.accum_steps} accumulation x {self.dist.world_size} process(es)")

        groups = self.method.optim_groups()
        self.params = {g: [p for _, p in named] for g, named in groups.items()}
        # what the flat all-reduce averages: all of them, or under fsdp those it did not shard (it reduces its own)
        self.all_reduced = {g: [p for p in params if not is_sharded(p)] for g, params in self.params.items()}
        seen = [id(p) for params in self.params.values() for p in params]
        if len(seen) != len(set(seen)):
            raise RuntimeError(f"{type(self.method).__name__}.optim_groups puts a parameter in two groups")
        self.optimizers, self.schedulers, self.spans = {}, {}, {}
        for g, named in groups.items():
            if not named:   # an empty group (e.g. a shared backbone when sharing is off) gets no optimiser
                continue
            group_cfg = cfg.optim.groups.get(g, GroupOptimConfig())
            self.optimizers[g] = make_optimizer(named, cfg, self.lr * group_cfg.lr_scale, group_cfg,
                                                self.method.no_weight_decay_keys)
            self.spans[g] = self.method.group_steps(g, self.total_steps)
            self.schedulers[g] = self._scheduler(self.optimizers[g], group_cfg, self.spans[g])
        self.multi_stage = len(self.method.stages) > 1
        self.clip_scope = cfg.optim.clip_scope or self.method.clip_scope
        self.fused = all(opt.defaults.get("fused") for opt in self.optimizers.values())

        cuda = self.device.type == "cuda"
        bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        if t.randomness == "keyed":
            draws.key_drop_paths(self.method)
        if t.activation_checkpointing:
            wrapped = checkpoint_blocks(self.method, t.activation_checkpointing)
            self._print(f"activation checkpointing: {wrapped} blocks recompute their activations in the backward")
        self.forward = torch.compile(self.method) if t.compile else self.method

        # guard and counters live on the device: read only when logging
        self.nonfinite_total = torch.zeros((), device=self.device)
        self.streak = torch.zeros((), device=self.device)
        self.max_streak = torch.zeros((), device=self.device)
        self.skipped_images = 0
        self.train_seconds = 0.0          # wall time of the training steps, summed over resumes
        self.start_step = 0
        self.best = None                  # {"metric", "value", "step"} of RUN/best.pt (train.keep_best)
        self._restored_rng = None
        if self.dist.is_main and self.out.is_dir():  # a save cut short by a crash leaves only its temporary file
            for stale in self.out.glob(".*.pt.tmp*"):
                stale.unlink(missing_ok=True)
        self.checkpointer = DistributedCheckpointer(self.out, self.dist.is_main, t.async_checkpoint, t.keep_every) \
            if t.checkpoint == "dcp" else None
        if ckpt is not None:
            self._restore(ckpt, resume_from)
        torch.manual_seed(t.seed + 1 + self.dist.rank)  # masks and drop-path differ across ranks
        if self._restored_rng is not None:
            torch.set_rng_state(self._restored_rng["cpu"])
            if cuda and "cuda" in self._restored_rng:
                torch.cuda.set_rng_state(self._restored_rng["cuda"], self.device)
        self.sample_images = self._fixed_sample_batch()
        self.probe = None
        if t.online_probe and self.dist.is_main:
            from mimkit.eval.online import OnlineProbe
            held_out = None if self.val_data is None else \
                torch.utils.data.Subset(self.val_data, self.val_indices[:t.probe_test].tolist())
            self.probe = OnlineProbe(cfg, self.in_chans, self.mean.flatten().tolist(), self.std.flatten().tolist(),
                                     self.device, held_out)
            self._print(f"{self.probe.describe()}, every {t.probe_every} steps")

    @staticmethod
    def learning_rate(o, global_batch: int) -> tuple[float, str]:
        """The peak lr of the run and how it follows from the recipe: optim.lr at optim.lr_batch, scaled linearly to
        this global batch, or optim.base_lr per 256 images (MAE's rule)."""
        if o.lr is not None:
            lr = o.lr * global_batch / o.lr_batch
            scaled = f", scaled linearly to this run's {global_batch}" if global_batch != o.lr_batch else ""
            return lr, f"optim.lr {o.lr:g} given for a global batch of {o.lr_batch}{scaled}"
        return o.base_lr * global_batch / 256, f"optim.base_lr {o.base_lr:g} x {global_batch} / 256"

    def _scheduler(self, optimizer, group: GroupOptimConfig, span: tuple[int, int]):
        """Warm-up (the group's own, else optim.warmup_epochs) then cosine or SimMIM's multistep decay over the steps
        the group trains in (`span`: the whole run, or e.g. CIM's enhancer after its generator: its own warm-up and
        decay from its start); a compressed run (train.steps) keeps every epoch-based point at its share of the
        recipe. The scheduler counts from the span's start (`step_update(step - start)`)."""
        o = self.cfg.optim
        share = self.total_steps / max(self.recipe_steps, 1)
        length = span[1] - span[0]
        warmup = self.warmup_steps if group.warmup_epochs is None else \
            round(group.warmup_epochs * self.steps_per_epoch * share)
        warmup = min(warmup, max(length - 1, 0))
        if o.schedule == "multistep":
            milestones = [round(m * self.steps_per_epoch * share) - span[0] for m in o.milestones]
            # timm decays once t + 1 passes decay_t (t counted after warm-up); SimMIM decays from step m on
            return MultiStepLRScheduler(optimizer, decay_t=[m - warmup + 1 for m in milestones], decay_rate=o.decay_rate,
                                        warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
        return CosineLRScheduler(optimizer, t_initial=max(length - warmup, 1), lr_min=o.min_lr,
                                 warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)

    # ------------------------------------------------------------------ held-out images
    VAL_EPOCH = 2 ** 31 - 1     # the keyed draws' epoch for held-out images: their masks never change

    def _hold_out(self, cfg: Config) -> None:
        """data.val_split: a seeded share of the training images held out (the sampler never deals them), or
        data.val_spec: another data set; `val_indices` are the (at most train.val_limit) images measured."""
        d, t = cfg.data, cfg.train
        self.train_indices, self.val_data, self.val_indices = None, None, None
        self.train_count = len(self.dataset)
        if d.val_split:
            if isinstance(self.dataset, ShardStream):
                raise ValueError("data.val_split holds out images of a folder or IDX data set; a shard stream has no "
                                 "random access: give the held-out images with --val-data SPEC")
            n = len(self.dataset)
            held = round(n * d.val_split)
            if held < 1:
                raise ValueError(f"data.val_split={d.val_split} holds out no image of {n}; raise it")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed * 1_000_003 + 777))
            self.train_indices = order[held:].sort().values
            self.train_count = len(self.train_indices)
            self.val_data, self.val_indices = self.dataset, order[:min(held, t.val_limit)].sort().values
        elif d.val_spec:
            self.val_data = build_dataset(d.val_spec, "train", channels=d.channels)
            if self.val_data.channels != self.in_chans:
                raise ValueError(f"the held-out data ({d.val_spec}) has {self.val_data.channels}-channel images, the "
                                 f"training data {self.in_chans}; give held-out images of the same kind")
            order = torch.randperm(len(self.val_data), generator=torch.Generator().manual_seed(t.seed + 777))
            self.val_indices = order[:t.val_limit].sort().values
        if self.val_data is not None:
            self._print(f"held out: {len(self.val_indices)} images measured every {t.val_every} steps"
                        + (f" ({self.train_count} of {len(self.dataset)} trained on)" if d.val_split else ""))

    def validate(self, step: int) -> dict:
        """The method's own loss and its parts on the held-out images, with masks, noise and sampling fixed per image
        (keyed by the image), in eval mode (no drop path); buffers a forward updates (ADA's statistics, running
        means) are put back, so training goes on as without it. Every rank computes it (fsdp needs them all)."""
        was_training = self.method.training
        self.method.eval()
        buffers = {name: b.clone() for name, b in self.method.named_buffers()}
        transform = EvalTransform(self.cfg.model.img_size)
        epoch, batch = self.schedule_epoch(step), self.cfg.data.batch_size
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, len(self.val_indices), batch):
            index = self.val_indices[start:start + batch]
            x = self._normalise(torch.stack([transform(self.val_data[int(i)][0]) for i in index]))
            carry = {"step": step, "epoch": epoch, "total_steps": self.total_steps, "last_micro": True}
            total = torch.zeros((), device=self.device)
            for stage in self.method.schedule(step, epoch, self.total_steps):
                prefix = f"{stage.name}/" if self.multi_stage else ""
                keys = draws.sample_keys(self.cfg.train.seed, self.VAL_EPOCH, index.to(self.device), f"val/{stage.name}")
                with draws.keyed(keys), self.autocast():
                    out = self.method(x, stage=stage.name, carry=carry)
                total += out["loss"].detach().float()
                named = {**out["parts"], **({"loss": out["loss"]} if self.multi_stage else {})}
                for name, value in named.items():
                    sums[prefix + name] = sums.get(prefix + name, 0) + value.detach().float() * len(index)
            sums["loss"] = sums.get("loss", 0) + total * len(index)
        for name, b in self.method.named_buffers():
            b.copy_(buffers[name])
        self.method.train(was_training)
        names = list(sums)
        values = (torch.stack([sums[n] for n in names]) / len(self.val_indices)).tolist()
        row = dict(zip(names, values))
        headline = self.method.val_headline(row)
        if headline:
            row["loss_sum_of_stages"] = row["loss"]
            row.update(headline)
            row["loss"] = next(iter(headline.values()))
        return {"step": step, **{f"val/{name}": value for name, value in row.items()}}

    # ------------------------------------------------------------------ data
    def _micro_per_epoch(self) -> int:
        d = self.cfg.data
        if isinstance(self.dataset, ShardStream):     # whole batches of every worker, the same on every rank
            return self.dataset.batches_per_worker(self.dist.world_size, d.num_workers, d.batch_size) * \
                max(d.num_workers, 1)
        return self.train_count // self.dist.world_size // d.batch_size

    def _shard_batches(self, epoch: int, offset: int, transform):
        """One epoch of a streamed pack from batch `offset` on (see data/shards.py for the order)."""
        d = self.cfg.data
        stream = self.dataset.epoch(epoch, self.cfg.train.seed, self.dist.rank, self.dist.world_size, d.num_workers,
                                    d.batch_size, offset, transform)
        return DataLoader(stream, batch_size=d.batch_size, num_workers=d.num_workers, drop_last=True,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          generator=torch.Generator())  # its seed draw must not touch the global RNG

    def _micro_batches(self, start_micro: int):
        cfg = self.cfg
        per_epoch = self.micro_per_epoch
        epoch, offset = divmod(start_micro, per_epoch)
        d = cfg.data
        transform = PretrainTransform(cfg.model.img_size, d.crop_scale, d.crop_ratio, d.hflip, d.interpolation)
        # workers send box regions (or, decoding on the device, encoded JPEGs) and _prepare crops the batch on the
        # device; on a CPU the workers crop faster
        cuda = self.device.type == "cuda"
        batched = d.augment_on == "device" or d.decode_on == "device" or (d.augment_on == "auto" and cuda)
        encoded = batched and (d.decode_on == "device" or (d.decode_on == "auto" and cuda)) and \
            hasattr(self.dataset, "jpeg_bytes") and self.in_chans in (1, 3) and self.dataset.dtype == torch.uint8
        if isinstance(self.dataset, ShardStream):     # streamed: the workers crop (each sample decoded once)
            while True:
                yield from self._shard_batches(epoch, offset, transform)
                epoch, offset = epoch + 1, 0
        kind = EncodedCrops if encoded else BatchedCrops if batched else Augmented
        dataset = kind(self.dataset, transform)
        while True:
            sampler = ResumableSampler(len(self.dataset), cfg.train.seed, epoch, self.dist.rank,
                                       self.dist.world_size, skip=offset * cfg.data.batch_size,
                                       indices=self.train_indices)
            loader = DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler,
                                collate_fn=encoded_collate if encoded else pad_collate if batched else None,
                                num_workers=cfg.data.num_workers, drop_last=True,
                                pin_memory=self.device.type == "cuda", persistent_workers=False,
                                generator=torch.Generator())  # its seed draw must not touch the global RNG
            yield from loader
            epoch, offset = epoch + 1, 0

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        x = to_unit_float(x)
        return (x - self.mean) / self.std

    def _prepare(self, micro) -> torch.Tensor:
        """A loader batch -> normalised images on the device; a batched-crop batch is cropped there first."""
        if len(micro) == 3:
            return self._normalise(micro[0])
        pixels, params = micro[0], micro[3]
        if isinstance(pixels, list):           # encoded JPEGs: decoded here, on the device
            pixels, params, undecodable = decode_on_device(pixels, params, self.in_chans, self.device)
            self.skipped_images += undecodable
        x = to_unit_float(pixels.to(self.device, non_blocking=True))
        x = resized_crops(x, params, self.cfg.model.img_size, self.cfg.data.interpolation)
        return (x - self.mean) / self.std

    def _fixed_sample_batch(self) -> torch.Tensor:
        """The images of the reconstruction grids: 8 held-out ones where there are, else spread over the data."""
        transform = EvalTransform(self.cfg.model.img_size)
        if self.val_data is not None:
            return self._normalise(torch.stack([transform(self.val_data[int(i)][0]) for i in self.val_indices[:8]]))
        count = min(8, len(self.dataset))
        if isinstance(self.dataset, ShardStream):
            return self._normalise(torch.stack([transform(x) for x in self.dataset.head(count)]))
        step = max(1, len(self.dataset) // count)
        return self._normalise(torch.stack([transform(self.dataset[i * step][0]) for i in range(count)]))

    # ------------------------------------------------------------------ loop
    def train(self, stop_after: int | None = None) -> dict:
        """Runs to `train.steps` (or stops after step `stop_after`, checkpointing there, as a crash would)."""
        cfg, t = self.cfg, self.cfg.train
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log = MetricsLog(self.out, self.start_step if self.start_step else None) if self.dist.is_main else None
        self.warn_unreached_terms()
        batches = self._micro_batches(self.start_step * t.accum_steps)
        running: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}        # steps each running value was added in (a stage may skip steps)
        interactive = sys.stderr.isatty() and not self.quiet
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not interactive, dynamic_ncols=True)
        last_row: dict = {}
        tick, images_seen = time.perf_counter(), 0
        self.method.train()
        probing = self.probe is not None or (self.sharded and bool(t.online_probe))   # sharded: every rank gathers
        if probing and self.start_step == 0:                              # the encoder before training
            row = self._online_probe(0)
            if log is not None:
                log.write({"step": 0, **row})
        for step in range(self.start_step, self.total_steps):
            micro = [next(batches) for _ in range(t.accum_steps)]
            images = [self._prepare(m) for m in micro]
            places = [self._places(step * t.accum_steps + i, x.shape[0]) for i, x in enumerate(images)]
            self.skipped_images += sum(int(m[2].sum()) for m in micro)
            for g, scheduler in self.schedulers.items():
                scheduler.step_update(max(step - self.spans[g][0], 0))
            self._step(images, running, counts, step, places)
            step_done = step + 1
            images_seen += sum(x.shape[0] for x in images) * self.dist.world_size
            bar.update(1)
            probe_due = probing and (step_done % t.probe_every == 0 or step_done == self.total_steps)
            if step_done % t.log_every == 0 or step_done == self.total_steps:
                last_row = self._log_row(step_done, running, counts)     # syncs: the timing below is the device's
                elapsed = time.perf_counter() - tick
                self.train_seconds += elapsed
                last_row["img_per_s"] = images_seen / max(elapsed, 1e-9)
                last_row["step_s"] = elapsed / counts["loss"]            # Table 4 of GAN-MAE: time per scheme
                last_row["train_hours"] = self.train_seconds / 3600
                if probe_due:                                            # after the timing: not training time
                    last_row.update(self._online_probe(step_done))
                running, counts, images_seen, tick = {}, {}, 0, time.perf_counter()
                if log is not None:
                    log.write(last_row)
                    eta = _minutes((self.total_steps - step_done) * last_row["step_s"])   # at the last interval's pace
                    shown = {name: f"{value:.4f}" for name, value in self.shown.items()}
                    bar.set_postfix(**shown, img_s=f"{last_row['img_per_s']:.0f}", eta=eta)
                    if not interactive and not self.quiet:
                        print(f"step {step_done}/{self.total_steps} "
                              + " ".join(f"{name} {value}" for name, value in shown.items())
                              + f" lr {last_row['lr']:.2e} img/s {last_row['img_per_s']:.0f} eta {eta}", flush=True)
                if last_row["max_nonfinite_streak"] >= t.nan_patience:
                    self._save(step_done)
                    if self.checkpointer is not None:
                        self.checkpointer.finish()
                    raise TrainingDiverged(
                        f"{int(last_row['max_nonfinite_streak'])} steps in a row had a non-finite loss or gradient "
                        f"(skipped); lower the lr (optim.base_lr or optim.lr), set optim.clip_grad, or use "
                        f"train.precision=fp32")
            elif probe_due:
                probe_row = self._online_probe(step_done)
                tick += probe_row["probe/seconds"]                       # not training time
                if log is not None:
                    log.write({"step": step_done, **probe_row})
            if t.sample_every and step_done % t.sample_every == 0 and (self.dist.is_main or self.sharded):
                grid = self.save_samples(self.out / "samples" / f"step-{step_done:07d}.png", step_done)
                if self.dist.is_main:
                    if log is not None:
                        log.image("reconstruction", grid, step_done)
                    self.save_loss_curves()
            if self.val_data is not None and t.val_every and (step_done % t.val_every == 0
                                                              or step_done == self.total_steps):
                val_row = self.validate(step_done)
                if log is not None:
                    log.write(val_row)
                    if not self.quiet:
                        print(f"held-out at step {step_done}: loss {val_row['val/loss']:.4f}", flush=True)
                value = val_row.get(t.keep_best) if t.keep_best else None
                if value is not None and (self.best is None or value < self.best["value"]):
                    self.best = {"metric": t.keep_best, "value": value, "step": step_done}
                    self._save(step_done, best=True)
            if step_done % t.ckpt_every == 0 or step_done == self.total_steps:
                self._save(step_done)
            if t.keep_every and step_done % t.keep_every == 0:
                self._save(step_done, self.out / f"checkpoint-{step_done:07d}.pt")
            if stop_after is not None and step_done >= stop_after:
                self._save(step_done)
                break
        bar.close()
        if self.checkpointer is not None:
            self.checkpointer.finish()               # an async save in flight becomes current
        finished = stop_after is None or stop_after >= self.total_steps
        if finished and self.start_step < self.total_steps and (self.dist.is_main or self.sharded) and t.sample_every:
            self.save_samples(self.out / "samples" / "final.png", self.total_steps)
        if self.dist.is_main and self.start_step < self.total_steps and t.sample_every:   # 0: no pictures
            self.save_loss_curves()
        if log is not None:
            log.close()
        return last_row

    def schedule_epoch(self, step: int) -> int:
        """The recipe epoch a step falls in: with train.steps compressing (or stretching) the recipe, the step's share
        of the recipe, as the warm-up and milestones, so epoch-based decisions (Perceptual MAE's even epochs) happen
        in a short run as in the full one."""
        return (step * self.recipe_steps // max(self.total_steps, 1)) // self.steps_per_epoch

    def warn_unreached_terms(self) -> None:
        """One warning naming each stage or loss term the method declares that no step of this run reaches (the
        whole run, before a resume too; nothing is said when no step is left to train)."""
        if self.start_step >= self.total_steps or not self.dist.is_main:
            return
        declared = self.method.declared_terms()
        seen: set[str] = set()
        for step in range(self.total_steps):
            seen |= self.method.terms_at(step, self.schedule_epoch(step), self.total_steps)
            if declared <= seen:
                return
        warnings.warn(f"{', '.join(sorted(declared - seen))} never run(s) in this run's {self.total_steps} steps "
                      f"({self.recipe_steps / self.steps_per_epoch:g} recipe epochs compressed into them); lengthen the "
                      f"run (train.steps / train.epochs) to train with it", stacklevel=2)

    def _places(self, micro_index: int, batch: int) -> tuple[int, torch.Tensor] | None:
        """(data epoch, the images' places in that epoch's global order) of a micro-batch, from which its keyed draws
        follow (None under train.randomness=stream). A folder's order is global (ResumableSampler deals rank r the
        places r, r + world, ...), so the places do not depend on the world size; a shard stream's are the rank's
        own (its order depends on the world size anyway)."""
        if self.cfg.train.randomness != "keyed":
            return None
        epoch, offset = divmod(micro_index, self.micro_per_epoch)
        local = torch.arange(batch, device=self.device) + offset * batch
        if isinstance(self.dataset, ShardStream):
            return epoch, local * self.dist.world_size + self.dist.rank
        return epoch, self.dist.rank + self.dist.world_size * local

    def _step(self, images: list[torch.Tensor], running: dict, counts: dict, step: int, places: list | None = None) -> None:
        accum = len(images)
        epoch = self.schedule_epoch(step)
        carries = [{"step": step, "epoch": epoch, "total_steps": self.total_steps, "last_micro": i == accum - 1}
                   for i in range(accum)]
        bad = torch.zeros((), device=self.device)
        total = torch.zeros((), device=self.device)

        logged: set[str] = set()              # names logged this step (a stage may skip steps): counted once each

        def add(name: str, value: torch.Tensor) -> None:
            running[name] = running.get(name, 0) + value
            logged.add(name)

        for stage in self.method.schedule(step, epoch, self.total_steps):
            prefix = f"{stage.name}/" if self.multi_stage else ""
            for group, params in self.params.items():
                if group not in stage.keep_grads:   # kept: an earlier stage's gradients, added to here
                    for p in params:
                        p.grad = None
            stage_loss = torch.zeros((), device=self.device)
            for x, place, carry in zip(images, places or [None] * accum, carries):
                keys = None if place is None else draws.sample_keys(self.cfg.train.seed, place[0], place[1], stage.name)
                with draws.keyed(keys), self.autocast():
                    out = self.forward(x, stage=stage.name, carry=carry)
                (out["loss"] / accum).backward()
                stage_loss += out["loss"].detach().float() / accum
                for name, value in out["parts"].items():
                    add(prefix + name, value.detach().float() / accum)
            total += stage_loss
            if self.multi_stage:
                add(f"{prefix}loss", stage_loss)
            groups = [g for g in stage.groups if g in self.optimizers]
            for group in groups:
                D.average_gradients(self.all_reduced[group], self.dist.world_size)
            clip = self.cfg.optim.clip_grad or float("inf")
            if self.clip_scope == "stage":    # one norm over every parameter the stage steps (BEiT-style: CIM, CAE)
                norm = whole(torch.nn.utils.clip_grad_norm_([p for g in groups for p in self.params[g]], clip))
                add(f"{prefix}grad_norm", torch.nan_to_num(norm, 0.0))
                norms = dict.fromkeys(groups, norm)
            else:
                norms = {g: whole(torch.nn.utils.clip_grad_norm_(self.params[g], clip)) for g in groups}
                for group, norm in norms.items():
                    add(f"{prefix}grad_norm_{group}", torch.nan_to_num(norm, 0.0))
            for group in groups:
                found_inf = (~torch.isfinite(norms[group])).float()
                optimizer = self.optimizers[group]
                if self.fused:
                    optimizer.found_inf = found_inf
                    optimizer.step()
                elif not found_inf.item():
                    optimizer.step()
                bad = torch.maximum(bad, found_inf)
        add("loss", total)
        for name in logged:
            counts[name] = counts.get(name, 0) + 1
        self.nonfinite_total += bad
        self.streak = (self.streak + bad) * bad
        self.max_streak = torch.maximum(self.max_streak, self.streak)

    def _online_probe(self, step: int) -> dict:
        encoder = self.method.encoder.model
        if self.sharded:                  # gathered whole on every rank (a collective); rank 0 probes its copy
            weights = full_state(self.method, {})[0]
            if self.probe is None:
                return {"probe/seconds": 0.0}
            n = len(self.probe_prefix)
            self.probe_encoder.load_state_dict({k[n:]: v for k, v in weights.items() if k.startswith(self.probe_prefix)})
            encoder = self.probe_encoder
        row = self.probe(encoder)
        self.method.train()
        # said even when quiet (a collapse wastes the rest of the run), but not in the warm-up, whose high-lr steps
        # pass through low-rank features (eval/rankme.py has the numbers)
        if self.probe.warning and step > self.warmup_steps:
            print(f"step {step}: {self.probe.warning}", file=sys.stderr, flush=True)
        if not self.quiet:
            shown = [f"{k.split('/')[1].replace('_top1', '')} {v:.2f}%" for k, v in row.items() if k.endswith("top1")]
            if "probe/rankme" in row:
                shown.append(f"rankme {row['probe/rankme']:.1f}, spread {row['probe/feature_spread']:.2f}")
            print(f"online probe at step {step}: {', '.join(shown)} ({row['probe/seconds']:.1f} s)", flush=True)
        return row

    def _log_row(self, step: int, running: dict, counts: dict) -> dict:
        names = list(running)
        values = torch.stack([torch.as_tensor(running[n], device=self.device).float() for n in names]
                             + [self.nonfinite_total, self.max_streak])
        values = D.mean_over_ranks(values).tolist()     # the one sync per log: every rank's images count
        row = {"step": step, "epoch": round(step / self.steps_per_epoch, 4)}
        row["loss"] = values[names.index("loss")] / counts["loss"]
        row.update({n: v / counts[n] for n, v in zip(names, values) if n != "loss"})
        row["lr"] = next(iter(self.optimizers.values())).param_groups[0]["lr"]
        if len(self.optimizers) > 1:
            row.update({f"lr_{g}": opt.param_groups[0]["lr"] for g, opt in self.optimizers.items()})
        row["nonfinite_steps"] = int(values[-2])
        row["max_nonfinite_streak"] = int(values[-1])
        self.max_streak.zero_()  # streaks are reported per logging interval
        self.max_streak += self.streak
        row["skipped_images"] = self.skipped_images
        headline = self.method.headline(row)
        if headline:
            row["loss_sum_of_stages"] = row["loss"]
            row["loss"] = next(iter(headline.values()))
            row.update(headline)
        self.shown = headline or {"loss": row["loss"]}             # what the progress line prints
        return row

    @torch.no_grad()
    def save_samples(self, path: Path, step: int) -> torch.Tensor:
        was_training = self.method.training
        self.method.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # sampling must not shift the training RNG
            torch.manual_seed(0)
            if self.sharded:             # the root's own weights, gathered outside its forward (blocks gather their own)
                self.method.unshard()
            with self.autocast():
                rows = self.method.reconstruction_rows(self.sample_images)
            if self.sharded:
                self.method.reshard()
        self.method.train(was_training)
        if not self.dist.is_main:       # under fsdp every rank computes the rows (its shards are needed), one writes
            return None
        held_out = ", held-out images" if self.val_data is not None else ""
        return save_rows_grid(rows, self.mean, self.std, path, title=f"{self.picture_title}, step {step}{held_out}")

    def save_loss_curves(self) -> Path | None:
        """RUN/loss-curves.png from metrics.jsonl (the whole run, resumed sessions included)."""
        return save_loss_curves(read_metrics(self.out), self.out / "loss-curves.png", self.picture_title)

    @property
    def picture_title(self) -> str:
        return f"{self.out.parent.name}/{self.out.name} ({self.cfg.method['name']})"

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _save(self, step: int, path: Path | None = None, best: bool = False) -> None:
        """RUN/last.pt (or `path`; `best`: RUN/best.pt), whole; under train.checkpoint=dcp a sharded step directory
        instead (every rank writes its shards; `path`, a keep_every copy, is then the step directory kept; `best`
        moves RUN/best to it)."""
        rng = D.gather_objects(self._rng_state())  # every rank's RNG, so a resumed world reproduces the run
        payload = {
            "format": "mimkit-run", "version": mimkit.__version__, "step": step, "config": self.cfg.to_dict(),
            "in_chans": self.in_chans, "data_stats": {"mean": self.mean.flatten().tolist(),
                                                      "std": self.std.flatten().tolist()},
            "frozen": self.frozen, "parallel": "fsdp" if self.sharded else "ddp",
            "trainable": [n for n, p in self.method.named_parameters() if p.requires_grad],
            "rng": rng, "world_size": self.dist.world_size,
            "counters": {"nonfinite_total": float(self.nonfinite_total), "skipped_images": self.skipped_images,
                         "train_seconds": self.train_seconds},
            "best": self.best,
        }
        if self.checkpointer is not None:
            if path is None or best:
                self.checkpointer.save(step, payload, self.method, self.optimizers, tuple(self.method.frozen_parts),
                                       best=best)
            return
        path = self.out / "best.pt" if best else path
        if self.sharded or self.dist.is_main:      # sharded: gathered whole on every rank (collectives)
            model, optimizers = full_state(self.method, self.optimizers)
            kept = self.method.trainable_state_dict().keys()
            payload["model"] = {k: v for k, v in model.items() if k in kept}
            payload["optimizers"] = optimizers
        if self.dist.is_main:
            save_atomic(payload, path or self.out / "last.pt")

    def _restore(self, ckpt: dict, path: Path) -> None:
        if ckpt.get("checkpoint") == "dcp":        # sharded files, resharded to this world as they are read
            load_into(path, self.method, self.optimizers, ckpt, tuple(self.method.frozen_parts))
        else:
            if not self.sharded:                   # sharded: the weights went in before sharding
                self.method.load_run_state(ckpt["model"])
            load_optimizers(self.method, self.optimizers, ckpt["optimizers"])   # by name: any parallel mode or world
        self.start_step = int(ckpt["step"])
        saved = ckpt["config"]
        was = saved["data"]["batch_size"] * saved["train"]["accum_steps"] * ckpt.get("world_size", 1)
        if was != self.global_batch:
            self._print(f"note: {path.name} was written at a global batch of {was}, this run has {self.global_batch}: "
                        f"it goes on with another lr, epoch length and data order; to continue the same run set "
                        f"data.batch_size x train.accum_steps x processes = {was}")
        rng = ckpt["rng"]
        mine = rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0]
        self._restored_rng = mine
        self.nonfinite_total.fill_(ckpt["counters"]["nonfinite_total"])
        self.skipped_images = int(ckpt["counters"]["skipped_images"])
        self.train_seconds = float(ckpt["counters"].get("train_seconds", 0.0))
        self.best = ckpt.get("best")
        self._print(f"resuming {self.out} from step {self.start_step}" + (f" ({path.name})" if path.name != "last.pt" else ""))

    def _print(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
