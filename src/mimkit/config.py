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
    arch: str = "vit"                       # vit | swin
    size: str = "base"                      # see backbones.VIT_SIZES / SWIN_SIZES
    img_size: list = field(default_factory=lambda: [224, 224])  # [H, W]; may be non-square
    patch_size: int = 16
    embed_dim: int | None = None            # override the size's width
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0
    window_size: int = 7                    # swin only
    pool: str = "cls"                       # probes: cls | mean


@dataclass
class DataConfig:
    spec: str = "fashion-mnist"             # fashion-mnist | idx:DIR | folder:DIR
    batch_size: int = 64                    # per device and micro-step
    num_workers: int = 2
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])   # RandomResizedCrop scale (MAE: 0.2-1)
    crop_ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = True
    mean: list | None = None                # per channel; None = from the dataset
    std: list | None = None


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4                 # lr = base_lr * global_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float | None = None
    warmup_epochs: float = 40.0


@dataclass
class TrainConfig:
    epochs: float = 800.0
    steps: int | None = None                # overrides epochs when set
    warmup_steps: int | None = None         # overrides optim.warmup_epochs when set
    accum_steps: int = 1
    precision: str = "auto"                 # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500                   # RUN/last.pt
    keep_every: int = 0                     # RUN/checkpoint-STEP.pt; 0 = only at the end
    sample_every: int = 500                 # RUN/samples/step-STEP.png; 0 = never
    nan_patience: int = 20                  # stop after this many non-finite steps in a row


@dataclass
class Config:
    method: dict = field(default_factory=lambda: {"name": "mae"})
    model: ModelConfig = field(default_factory=ModelConfig)
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
            raise _unknown_key(prefix + key, _valid_keys(root) + _method_keys(data if cls is Config else {}))
        sub = _dataclass_type(cls, key)
        kwargs[key] = build_dataclass(sub, value or {}, f"{prefix}{key}.", root) if sub else \
            _coerce(cls.__dataclass_fields__[key].type, value, prefix + key)
    return cls(**kwargs)


def _coerce(annotation, value: Any, key: str) -> Any:
    """YAML reads '2e-3' as a string and '1' as an int: make numbers fit the field's declared type."""
    ann = str(annotation)
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
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pick one from configs/ (e.g. configs/mae_vit-mini_fmnist-tiny.yaml)")
    return yaml.safe_load(path.read_text()) or {}


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
    method_options(cfg)


def method_options(cfg: Config):
    """The method's typed options (a dataclass instance) from `cfg.method`."""
    from mimkit.methods import METHODS
    name = cfg.method.get("name", "mae")
    options_cls = METHODS[name].options
    fields = {f.name for f in dataclasses.fields(options_cls)}
    for key in cfg.method:
        if key != "name" and key not in fields:
            raise _unknown_key(f"method.{key}", [f"method.{f}" for f in fields] + ["method.name"])
    return options_cls(**{k: _coerce(options_cls.__dataclass_fields__[k].type, v, f"method.{k}")
                          for k, v in cfg.method.items() if k != "name"})
