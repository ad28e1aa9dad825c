"""Typed configuration: dataclasses, YAML recipes in configs/, and `key=value` overrides.

Unknown keys are errors that name the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, with a sentence that says how to fix it."""


@dataclass
class ModelConfig:
    arch: str = "vit"                       # vit | swin | resnet (CIM's CNN enhancer)
    size: str = "base"                      # see backbones.VIT_SIZES / SWIN_SIZES / RESNET_SIZES
    img_size: list = field(default_factory=lambda: [224, 224])  # [H, W]; may be non-square
    patch_size: int = 16
    embed_dim: int | None = None            # override the size's width
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0
    position: str = "absolute"              # vit: absolute (learnt or sin-cos table) | shared_relative (SimMIM's ViT:
                                            # one relative position bias shared by all blocks, timm Beit)
    window_size: int = 7                    # swin only
    output_stride: int = 32                 # resnet only: 32, or 16 / 8 (last stages dilated, not strided)
    zero_init_last: bool = False            # resnet only: timm's init (each block's last BN at 0); false: torchvision's
    pool: str = "cls"                       # probes: cls | mean


@dataclass
class DataConfig:
    spec: str = "fashion-mnist"             # fashion-mnist | idx:DIR | folder:DIR
    channels: int | None = None             # folders: convert every image to this many channels (None: majority)
    batch_size: int = 64                    # per device and micro-step
    val_split: float = 0.0                  # share of the training images held out (seeded; never trained on)
    val_spec: str | None = None             # held-out images from another spec instead (--val-data)
    num_workers: int = 2
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])   # RandomResizedCrop scale (MAE: 0.2-1)
    crop_ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = True
    interpolation: str = "bicubic"          # crop resizing: bicubic (MAE) | bilinear
    shuffle_buffer: int = 1000              # shards: samples in each worker's seeded shuffle buffer
    max_missing: float = 0.01               # shards: share of the listed samples that truncated or missing shards may
                                            # lack before the run stops (below it: one warning naming them)
    decode_on: str = "auto"                 # folders' JPEGs: worker (a batch per decode_jpeg call) | device (the
                                            # training device, nvjpeg on CUDA) | auto: device with device crops on CUDA
    augment_on: str = "auto"                # device: crops for a whole batch in one call | worker: per image | auto:
                                            # device when training on CUDA (on a CPU the workers' kernels are faster)
    mean: list | None = None                # per channel; None = from the dataset
    std: list | None = None


@dataclass
class OptimConfig:
    base_lr: float | None = None            # lr = base_lr * global_batch / 256 (MAE's rule); None: 1.5e-4 unless optim.lr
    lr: float | None = None                 # or an absolute lr at global batch lr_batch (a paper's stated lr and batch),
    lr_batch: int | None = None             # scaled linearly when the run's global batch differs; exclusive with base_lr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float | None = None
    clip_scope: str | None = None           # group (a norm per optimiser group) | stage (one norm over every group a
                                            # stage steps, BEiT-style code); None: the method's (stage: CIM, CAE)
    warmup_epochs: float = 40.0
    schedule: str = "cosine"                # cosine | multistep (SimMIM's 800-epoch recipes)
    milestones: list = field(default_factory=lambda: [700])   # multistep: epochs where lr is multiplied by decay_rate
    decay_rate: float = 0.1
    groups: dict = field(default_factory=dict)   # per optimiser group: {name: GroupOptimConfig keys}


@dataclass
class GroupOptimConfig:
    """Settings of one optimiser group (e.g. `optim.groups.discriminator.lr_scale=0.5`); unset = optim.*."""
    lr_scale: float = 1.0
    betas: list | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None


@dataclass
class TrainConfig:
    epochs: float = 800.0
    steps: int | None = None                # overrides epochs when set
    warmup_steps: int | None = None         # overrides optim.warmup_epochs when set
    accum_steps: int = 1
    precision: str = "auto"                 # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    parallel: str = "ddp"                   # ddp (flat gradient all-reduce) | fsdp (FSDP2; engine/parallel.py)
    reshard_after_forward: bool = True      # fsdp: false keeps gathered blocks from forward to backward (ZeRO-2-like)
    sync_batchnorm: bool = False            # BatchNorm statistics over the global batch (torch's SyncBatchNorm, GPUs)
    activation_checkpointing: int | bool = False   # true: recompute every block's activations in the backward;
                                                   # N: the first N blocks of each stack (engine/activations.py)
    seed: int = 0
    randomness: str = "keyed"               # keyed: masks, noise, drop path drawn from each image's key (the same
                                            # run at any world size; keyed_random.py) | stream: each rank's torch RNG
    log_every: int = 10
    ckpt_every: int = 500                   # RUN/last.pt (or, train.checkpoint=dcp, a step directory)
    checkpoint: str = "whole"               # whole: one RUN/last.pt | dcp: sharded step directories and RUN/latest
    async_checkpoint: bool = False          # dcp: write while training goes on (dcp.async_save)
    keep_every: int = 0                     # RUN/checkpoint-STEP.pt every N steps; 0 = none (last.pt only)
    sample_every: int = 500                 # RUN/samples/step-STEP.png; 0 = never
    val_every: int = 500                    # held-out loss every N steps (with data.val_split or data.val_spec); 0 = never
    val_limit: int = 1000                   # held-out images the loss is measured on (a fixed subset)
    keep_best: str | None = None            # val/loss (or another logged val/ name): RUN/best.pt at its lowest
    nan_patience: int = 20                  # stop after this many non-finite steps in a row
    online_probe: str | None = None         # knn | linear | rankme (no labels), comma-separated: probe while training
    probe_every: int = 1000                 # steps between online probes (and one before the first step)
    probe_train: int = 2000                 # labelled train images the probe fits on (a fixed, seeded subset)
    probe_test: int = 1000                  # test images it is measured on
    probe_data: str | None = None           # a labelled dataset spec for the probe; None: data.spec


@dataclass
class TokenizerConfig:
    path: str | None = None                 # RUN/last.pt of `mimkit tokenizer train`, or a tokenizer .safetensors
    input_size: list | None = None          # [H, W] px the method feeds it (None: the size whose token grid is the
                                            # grid the method predicts on, e.g. 112 for DALL-E under a 224 px ViT-B/16)


@dataclass
class Config:
    method: dict = field(default_factory=lambda: {"name": "mae"})
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        keys.extend(_valid_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"])
    return keys


def _dataclass_type(cls, name: str):
    default = cls.__dataclass_fields__[name].default_factory
    if default is not dataclasses.MISSING:
        value = default()
        return type(value) if dataclasses.is_dataclass(value) else None
    return None


def _unknown_key(key: str, candidates: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys are: {', '.join(sorted(candidates))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def build_dataclass(cls, data: dict, prefix: str = "", root=None):
    """`cls(**data)` with nested sections, typed values and an error naming the nearest key for unknown ones."""
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            candidates = _valid_keys(root) + _method_keys(data if cls is Config else {}) if root is Config else \
                [prefix + k for k in _valid_keys(cls)]
            raise _unknown_key(prefix + key, candidates)
        sub = _dataclass_type(cls, key)
        kwargs[key] = build_dataclass(sub, value or {}, f"{prefix}{key}.", root) if sub else \
            _coerce(cls.__dataclass_fields__[key].type, value, prefix + key)
    return cls(**kwargs)


def _coerce(annotation, value: Any, key: str) -> Any:
    """YAML reads '2e-3' as a string and '1' as an int: make numbers fit the field's declared type."""
    ann = str(annotation)
    if isinstance(value, str) and ann.startswith("str"):   # e.g. 'auto' where a number is also allowed
        return value
    if value is None or isinstance(value, bool):
        if isinstance(value, bool) and "bool" not in ann and ann not in ("Any", "typing.Any"):
            raise ConfigError(f"config key '{key}' expects {ann}, got {value!r}")
        return value
    if "float" in ann and isinstance(value, (str, int)):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if ann.startswith("int") and not isinstance(value, int):
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if ann.startswith("bool") and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    return value


def _method_keys(data: dict) -> list[str]:
    from mimkit.methods import METHODS  # late import: methods import config
    name = (data.get("method") or {}).get("name", "mae")
    options = METHODS[name].options if name in METHODS else None
    return [f"method.{f.name}" for f in dataclasses.fields(options)] + ["method.name"] if options else []


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_dict(data: dict) -> Config:
    cfg = build_dataclass(Config, data)
    validate_method(cfg)
    validate_groups(cfg)
    validate_values(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pick one from configs/ (e.g. configs/mae_vit-mini_fmnist-tiny.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "a syntax error"
        raise ConfigError(f"{path} is not valid YAML{where} ({problem}); fix the file there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a mapping of sections (method:, model:, data:, "
                          f"optim:, train:); write the recipe as such a mapping")
    return data


def validate_groups(cfg: Config) -> None:
    """`optim.groups.NAME.*`: NAME must be one of the method's optimiser groups; keys as GroupOptimConfig."""
    from mimkit.methods import METHODS
    method = METHODS[cfg.method.get("name", "mae")]
    names = sorted({g for stage in method.stages for g in stage.groups})
    groups = {}
    for name, values in (cfg.optim.groups or {}).items():
        if name not in names:
            raise ConfigError(f"optim.groups.{name}: {cfg.method.get('name', 'mae')} has no optimiser group "
                              f"'{name}'; its groups are {', '.join(names)}")
        if isinstance(values, GroupOptimConfig):
            values = dataclasses.asdict(values)
        groups[name] = build_dataclass(GroupOptimConfig, values or {}, f"optim.groups.{name}.", GroupOptimConfig)
    cfg.optim.groups = groups


def _check(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: it must be {rule}")


def validate_values(cfg: Config) -> None:
    """Range checks of every value whose type alone does not make it valid; one sentence per problem."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _check(m.arch in ("vit", "swin", "resnet"), "model.arch", m.arch, "vit, swin or resnet")
    _check(m.pool in ("cls", "mean"), "model.pool", m.pool, "cls or mean")
    _check(m.arch != "resnet" or m.pool == "mean", "model.pool", m.pool, "mean for a ResNet (global average pooling)")
    _check(m.output_stride in (8, 16, 32), "model.output_stride", m.output_stride, "8, 16 or 32")
    _check(m.position in ("absolute", "shared_relative"), "model.position", m.position, "absolute or shared_relative")
    _check(m.position == "absolute" or m.arch == "vit", "model.position", m.position,
           "absolute unless model.arch=vit (shared_relative is SimMIM's ViT)")
    size = m.img_size if isinstance(m.img_size, list) else [m.img_size, m.img_size]
    _check(len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size),
           "model.img_size", m.img_size, "a positive [height, width] in pixels, e.g. [224, 224]")
    m.img_size = list(size)
    _check(m.patch_size >= 1, "model.patch_size", m.patch_size, "a positive number of pixels")
    _check(m.arch == "resnet" or (size[0] % m.patch_size == 0 and size[1] % m.patch_size == 0), "model.patch_size",
           m.patch_size, f"a divisor of both sides of model.img_size={size}")
    for key in ("embed_dim", "depth", "num_heads"):
        value = getattr(m, key)
        _check(value is None or value >= 1, f"model.{key}", value, "a positive integer or null")
    _check(0 <= m.drop_path < 1, "model.drop_path", m.drop_path, "in [0, 1)")
    size = cfg.tokenizer.input_size
    if size is not None:
        size = size if isinstance(size, list) else [size, size]
        _check(len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size),
               "tokenizer.input_size", cfg.tokenizer.input_size, "a positive [height, width] in pixels or null (the "
               "size whose token grid is the model's patch grid)")
        cfg.tokenizer.input_size = list(size)
    _check(d.channels is None or d.channels >= 1, "data.channels", d.channels, "a positive integer or null")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "at least 1")
    _check(0 <= d.val_split < 0.5, "data.val_split", d.val_split, "in [0, 0.5): a share of the training images")
    _check(not (d.val_split and d.val_spec), "data.val_split", d.val_split, "0 when data.val_spec (--val-data) is given")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "0 or more")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", d.crop_scale,
           "[low, high] with 0 < low <= high <= 1")
    _check(len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", d.crop_ratio,
           "[low, high] with 0 < low <= high")
    _check(d.interpolation in ("bicubic", "bilinear"), "data.interpolation", d.interpolation, "bicubic or bilinear")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "at least 1")
    _check(0 <= d.max_missing <= 1, "data.max_missing", d.max_missing, "a share from 0 to 1")
    _check(d.decode_on in ("auto", "worker", "device"), "data.decode_on", d.decode_on, "auto, worker or device")
    _check(not (d.decode_on == "device" and d.augment_on == "worker"), "data.decode_on", d.decode_on,
           "worker or auto when data.augment_on=worker (decoding on the device feeds the device crops)")
    _check(d.augment_on in ("auto", "device", "worker"), "data.augment_on", d.augment_on, "auto, device or worker")
    if o.lr is not None and o.base_lr is not None:
        raise ConfigError(f"optim.lr={o.lr} and optim.base_lr={o.base_lr} both set the learning rate; keep one (drop "
                          f"the recipe's with optim.base_lr=null, or optim.lr=null optim.lr_batch=null)")
    if (o.lr is None) != (o.lr_batch is None):
        raise ConfigError("optim.lr and optim.lr_batch go together: the lr and the global batch it is given for "
                          "(e.g. optim.lr=1.5e-4 optim.lr_batch=16), or neither (optim.base_lr per 256 images)")
    if o.lr is None and o.base_lr is None:
        o.base_lr = 1.5e-4
    _check(o.base_lr is None or o.base_lr > 0, "optim.base_lr", o.base_lr, "positive")
    _check(o.lr is None or o.lr > 0, "optim.lr", o.lr, "positive")
    _check(o.lr_batch is None or o.lr_batch >= 1, "optim.lr_batch", o.lr_batch, "a global batch of at least 1")
    _check(o.min_lr >= 0, "optim.min_lr", o.min_lr, "0 or more")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "0 or more")
    _check(o.eps > 0, "optim.eps", o.eps, "positive")
    _check(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", o.clip_grad, "positive or null (no clipping)")
    _check(o.clip_scope in (None, "group", "stage"), "optim.clip_scope", o.clip_scope,
           "group, stage or null (the method's own)")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "0 or more")
    _check(o.schedule in ("cosine", "multistep"), "optim.schedule", o.schedule, "cosine or multistep")
    _check(all(v > 0 for v in o.milestones), "optim.milestones", o.milestones, "a list of positive epochs")
    _check(0 < o.decay_rate <= 1, "optim.decay_rate", o.decay_rate, "in (0, 1]")
    for name, group in o.groups.items():
        _check(group.lr_scale > 0, f"optim.groups.{name}.lr_scale", group.lr_scale, "positive")
        _check(group.weight_decay is None or group.weight_decay >= 0, f"optim.groups.{name}.weight_decay",
               group.weight_decay, "0 or more")
        _check(group.warmup_epochs is None or group.warmup_epochs >= 0, f"optim.groups.{name}.warmup_epochs",
               group.warmup_epochs, "0 or more")
        if group.betas is not None:
            _check_betas(group.betas, f"optim.groups.{name}.betas")
    _check_betas(o.betas, "optim.betas")
    _check(t.epochs > 0, "train.epochs", t.epochs, "positive")
    _check(t.steps is None or t.steps >= 1, "train.steps", t.steps, "at least 1 (or null to follow train.epochs)")
    _check(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "0 or more")
    _check(t.accum_steps >= 1, "train.accum_steps", t.accum_steps, "at least 1")
    _check(t.precision in ("auto", "bf16", "fp32"), "train.precision", t.precision, "auto, bf16 or fp32")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "at least 1")
    _check(t.ckpt_every >= 1, "train.ckpt_every", t.ckpt_every, "at least 1 (--ckpt-every)")
    _check(t.keep_every >= 0, "train.keep_every", t.keep_every, "0 (none: last.pt only) or more")
    _check(t.sample_every >= 0, "train.sample_every", t.sample_every, "0 (never) or more")
    _check(t.nan_patience >= 1, "train.nan_patience", t.nan_patience, "at least 1")
    _check(t.val_every >= 0, "train.val_every", t.val_every, "0 (never) or more")
    _check(t.val_limit >= 1, "train.val_limit", t.val_limit, "at least 1")
    _check(t.keep_best is None or (str(t.keep_best).startswith("val/") and (d.val_split or d.val_spec) and t.val_every),
           "train.keep_best", t.keep_best, "a logged val/ name (val/loss), with held-out images (data.val_split or "
           "--val-data) and train.val_every > 0")
    _check(t.parallel in ("ddp", "fsdp"), "train.parallel", t.parallel, "ddp or fsdp")
    _check(t.randomness in ("keyed", "stream"), "train.randomness", t.randomness, "keyed or stream")
    _check(t.checkpoint in ("whole", "dcp"), "train.checkpoint", t.checkpoint, "whole or dcp")
    _check(not t.async_checkpoint or t.checkpoint == "dcp", "train.async_checkpoint", t.async_checkpoint,
           "false unless train.checkpoint=dcp")
    _check(isinstance(t.activation_checkpointing, bool) or t.activation_checkpointing >= 1,
           "train.activation_checkpointing", t.activation_checkpointing, "true, false or a number of blocks (1 or more)")
    probes = [p.strip() for p in (t.online_probe or "").split(",") if p.strip()]
    _check(all(p in ("knn", "linear", "rankme") for p in probes) and len(set(probes)) == len(probes),
           "train.online_probe", t.online_probe, "knn, linear and/or rankme, comma-separated, or null (off)")
    _check(t.probe_every >= 1, "train.probe_every", t.probe_every, "at least 1")
    _check(t.probe_train >= 10 and t.probe_test >= 10, "train.probe_train / probe_test",
           (t.probe_train, t.probe_test), "10 images or more each")


def _check_betas(betas, key: str) -> None:
    _check(isinstance(betas, list) and len(betas) == 2 and all(0 <= b < 1 for b in betas), key, betas,
           "two numbers in [0, 1), e.g. [0.9, 0.95]")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path is not None else {}
    return config_from_dict(merge(data, parse_overrides(overrides or [])))


def validate_method(cfg: Config) -> None:
    """Checks method options against the method's own options dataclass (unknown key -> nearest key)."""
    from mimkit.methods import METHODS
    name = cfg.method.get("name", "mae")
    if name not in METHODS:
        near = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"choose one of {', '.join(METHODS)}"
        raise ConfigError(f"unknown method.name '{name}'; {hint}")
    archs = METHODS[name].archs
    if cfg.model.position != "absolute" and not METHODS[name].relative_positions:
        raise ConfigError(f"model.position={cfg.model.position} (SimMIM's ViT, every token encoded) is for simmim and "
                          f"vision_electra; {name} encodes the visible patches only: set model.position=absolute")
    if cfg.model.arch not in archs:
        raise ConfigError(f"method {name} pre-trains model.arch={' or '.join(archs)}, not {cfg.model.arch!r}; set "
                          f"model.arch={archs[0]}")
    opts = method_options(cfg)
    METHODS[name].check_config(cfg, opts)
    for key, why in METHODS[name].inert_options(opts):
        if key in cfg.method:
            raise ConfigError(f"method.{key} has no effect {why}; remove it (or change the option that makes it inert)")


def method_options(cfg: Config):
    """The method's typed options (a dataclass instance) from `cfg.method`."""
    from mimkit.methods import METHODS
    name = cfg.method.get("name", "mae")
    options_cls = METHODS[name].options
    fields = {f.name for f in dataclasses.fields(options_cls)}
    for key in cfg.method:
        if key != "name" and key not in fields:
            raise _unknown_key(f"method.{key}", [f"method.{f}" for f in fields] + ["method.name"])
    opts = options_cls(**{k: _coerce(options_cls.__dataclass_fields__[k].type, v, f"method.{k}")
                          for k, v in cfg.method.items() if k != "name"})
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name.endswith("mask_ratio") and value is not None:
            _check(0 < value < 1, f"method.{f.name}", value, "in (0, 1): the share of patches hidden")
        elif f.name.endswith(("_weight", "_std")) and isinstance(value, (int, float)) and not isinstance(value, bool):
            _check(value >= 0, f"method.{f.name}", value, "0 or more")
    return opts
