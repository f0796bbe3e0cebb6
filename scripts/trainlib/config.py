"""The training config: a schema of dataclasses with defaults, YAML files with `base:` inheritance, and
`--set section.key=value` overrides. Every key is validated; a wrong one is an error naming it."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .compiling import COMPILE_MODES


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    name: str = "atlas_tiny_patch16"  # any timm name (Atlas models after `import atlas`), or fastervit/<name>
    img_size: int = 224  # training and evaluation resolution (square)
    drop_path_rate: float = 0.0
    kwargs: dict = field(default_factory=dict)  # passed to the model constructor, e.g. {multiscale: false}


@dataclass
class DataConfig:
    name: str = "imagefolder"  # a dataset registered in atlas.datasets
    root: str | None = None  # folder with train/<class>/ and val/<class>/ (imagefolder)
    num_classes: int = 100
    workers: int = 8  # data loader processes per GPU
    pipeline: str = "exact"  # exact: timm's transforms (the released recipe); fast: uint8 crops, resized on device
    kwargs: dict = field(default_factory=dict)  # dataset-specific options, e.g. synthetic sizes


@dataclass
class AugConfig:
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float | None = None
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    hflip: float = 0.5
    interpolation: str = "bicubic"  # crop resize, RandAugment's geometric ops and eval resize (the released recipe)
    re_prob: float = 0.25  # random erasing
    re_mode: str = "pixel"
    re_count: int = 1
    eval_crop_pct: float = 1.0
    eval_crop_mode: str = "squash"  # squash: resize to img_size x img_size, then center crop
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # any timm.optim.create_optimizer_v2 name
    lr: float = 5e-4  # learning rate at the reference global batch size
    ref_batch_size: int | None = 2048  # lr scales by global_batch / ref_batch_size; null: no scaling
    weight_decay: float = 0.24  # not applied to norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = None  # max gradient norm


@dataclass
class ScheduleConfig:
    epochs: int = 320
    warmup_epochs: float = 30
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6


@dataclass
class TrainConfig:
    batch_size: int = 32  # per process (GPU)
    grad_accum: int = 1  # micro-batches per optimizer step
    device: str = "auto"  # auto (cuda when available), cuda or cpu
    amp: str = "bf16"  # bf16, fp16 or none; autocast is used on CUDA only
    compile: bool | str = "auto"  # auto, none, regional (block by block) or full; true: full, false: none
    grad_checkpointing: bool = False
    channels_last: bool = False
    sync_bn: bool = True  # SyncBatchNorm (Atlas: the stem) with several GPUs
    ema: bool = False
    ema_decay: float = 0.9998
    deterministic: bool = False
    log_every: int = 50  # optimizer steps between step records


@dataclass
class EvalConfig:
    every: int = 10  # epochs; the last epoch is always evaluated
    batch_size: int | None = None  # per process; default: train.batch_size
    drop_last: bool = False  # each rank drops its last partial batch: the released protocol (4,864 of 5,000 on 8x32)


@dataclass
class CheckpointConfig:
    every: int = 1  # epochs between last.pt updates; the last epoch always writes one
    every_steps: int = 0  # also write last.pt every N optimizer steps (0: off)
    every_minutes: float = 30.0  # and after this much training time since the last write (SIGTERM also saves)
    requeue: bool = True  # after saving on SIGTERM/SIGUSR1 under SLURM: scontrol requeue this job


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # used when the tensorboard package is installed
    wandb: bool = False
    wandb_project: str = "atlas"


@dataclass
class DebugConfig:
    max_steps: int | None = None  # stop with a checkpoint after this many optimizer steps (simulates a kill)
    nan_at_step: int | None = None  # make the loss NaN at this optimizer step (1-based)
    nan_grad_at_step: int | None = None  # make one gradient NaN at this step, the loss staying finite (1-based)


@dataclass
class Config:
    description: str = ""  # what this config reproduces
    paper_table: int | None = None  # table of arXiv:2503.12355 this run reproduces
    paper_row: str | None = None  # row name, as in scripts/data/paper_results.yaml
    paper_top1: float | None = None
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. 'optimizer.lr'."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str, cls) -> ConfigError:
    """An error naming `key`, the closest valid key and the keys valid in its section (`cls`)."""
    leaves = all_keys()
    candidates = leaves + sorted({k.split(".")[0] for k in leaves if "." in k})
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a leaf name in the wrong section, e.g. 'lr' for 'optimizer.lr'
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in leaves if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    valid = ", ".join(section + f.name for f in dataclasses.fields(cls))
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {valid}")


def _convert(value, hint, key: str):
    """Check `value` against the type `hint`; ints are accepted as floats and so are strings like '5e-4'."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for option in typing.get_args(hint):
            if option is not type(None):
                try:
                    return _convert(value, option, key)
                except ConfigError as e:
                    errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (bool, str, dict):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"unsupported type {hint} in the config schema")
    expected = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a mapping"}
    raise ConfigError(f"config key '{key}' expects {expected[hint]}, got {value!r}")


def from_dict(data: dict, cls=Config, prefix: str = ""):
    """Build the dataclass `cls` from a nested dict, validating every key and value."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in hints:
            raise _unknown_key(full, cls)
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                fields = ", ".join(f.name for f in dataclasses.fields(hints[key]))
                raise ConfigError(f"config key '{full}' is a section: expected a mapping with keys {fields}")
            kwargs[key] = from_dict(value, hints[key], full + ".")
        else:
            kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: mappings merge key by key; anything else in `update`, `{}` included, replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path, _seen: tuple = ()) -> dict:
    """Read a config file, resolving `base:` (a path or list of paths relative to the file) first."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config files include each other in a loop: {' -> '.join(map(str, _seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    bases = data.pop("base", None) or []
    merged = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge(merged, read_yaml(path.parent / base, _seen + (path,)))
    return merge(merged, data)


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one 'a.b.c=value' override; the value is parsed as a YAML scalar (or flow list/mapping)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{assignment}': value is not valid YAML ({e})") from None
    update = value
    for part in reversed(key.strip().split(".")):
        update = {part: update}
    return merge(data, update)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (with its bases) <- overrides, validated."""
    data = read_yaml(Path(path)) if path else {}
    for assignment in overrides:
        data = apply_override(data, assignment)
    cfg = from_dict(data)
    check(cfg)
    return cfg


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")  # timm's str_to_pil_interp
# The parts of timm's augmentation strings after the policy name (timm.data.auto_augment): a key, then its value
# (a number that starts with a digit, or one of the listed words).
AUGMENT_PARTS = {
    "rand": {
        "m": int,
        "n": int,
        "p": float,
        "mstd": float,
        "mmax": int,
        "inc": ("0", "1"),
        "t": ("weights", "3a", "3aw"),
    },
    "augmix": {"m": int, "w": int, "d": int, "a": float, "b": ("0", "1"), "mstd": float},
    **{policy: {"mstd": float} for policy in ("original", "originalr", "v0", "v0r", "3a")},  # AutoAugment
}


def _closest(value: str, allowed) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _augment_part_ok(kind, value: str) -> bool:
    if isinstance(kind, tuple):
        return value in kind
    try:
        return value[:1].isdigit() and kind(value) >= 0
    except ValueError:
        return False


def check_auto_augment(spec: str) -> None:
    """ConfigError unless ``spec`` is an augmentation string timm reads as written: timm skips parts it does not
    know (``rand-m9-incl`` is ``rand-m9``), so every part must be one of the policy's keys with a valid value."""
    policy, *parts = spec.split("-")
    if policy not in AUGMENT_PARTS:
        raise ConfigError(
            f"config key 'aug.auto_augment' starts with {policy!r}{_closest(policy, AUGMENT_PARTS)}; expected one of "
            f"{', '.join(AUGMENT_PARTS)} (e.g. rand-m9-mstd0.5-inc1), or null"
        )
    keys = AUGMENT_PARTS[policy]
    for part in parts:
        key = next((k for k in sorted(keys, key=len, reverse=True) if part.startswith(k)), None)
        value = part[len(key or "") :]
        if key is None or not _augment_part_ok(keys[key], value) or (key == "p" and float(value) > 1):
            syntax = ", ".join(f"{k}<{'|'.join(t) if isinstance(t, tuple) else t.__name__}>" for k, t in keys.items())
            raise ConfigError(
                f"config key 'aug.auto_augment' = {spec!r}: invalid part {part!r}; {policy} takes {syntax}"
            )


def check_optimizer_name(name: str) -> None:
    """ConfigError unless timm's ``create_optimizer_v2`` knows ``name`` (``lookahead_<name>`` included)."""
    from timm.optim import list_optimizers  # here: the schema itself needs no timm

    known = list_optimizers()
    *prefix, base = name.lower().split("_")
    if base not in known or prefix not in ([], ["lookahead"]):
        raise ConfigError(
            f"config key 'optimizer.name' is {name!r}, not a timm optimizer{_closest(base, known)}; "
            "see timm.optim.list_optimizers()"
        )


def check(cfg: Config) -> None:
    """Checks between values that the types alone do not catch."""
    a, o, s = cfg.aug, cfg.optimizer, cfg.schedule
    if isinstance(cfg.train.compile, bool):  # the older spelling
        cfg.train.compile = "full" if cfg.train.compile else "none"
    choices = {
        "train.compile": (cfg.train.compile, ("auto", *COMPILE_MODES)),
        "train.amp": (cfg.train.amp, ("bf16", "fp16", "none")),
        "train.device": (cfg.train.device, ("auto", "cuda", "cpu")),
        "aug.mixup_mode": (a.mixup_mode, ("batch", "pair", "elem")),
        "aug.interpolation": (a.interpolation, INTERPOLATIONS),
        "aug.eval_crop_mode": (a.eval_crop_mode, ("squash", "center", "border")),
        "aug.re_mode": (a.re_mode, ("pixel", "rand", "const")),
        "data.pipeline": (cfg.data.pipeline, ("exact", "fast")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}{_closest(value, allowed)}"
            )
    # (value, low, high, whether the interval is closed at low, at high); None: no bound, or a null value
    ranges = {
        "optimizer.lr": (o.lr, 0, None, False, None),
        "optimizer.weight_decay": (o.weight_decay, 0, None, True, None),
        "optimizer.eps": (o.eps, 0, None, False, None),
        "optimizer.clip_grad": (o.clip_grad, 0, None, False, None),
        "schedule.warmup_epochs": (s.warmup_epochs, 0, None, True, None),
        "schedule.warmup_lr": (s.warmup_lr, 0, None, True, None),
        "schedule.min_lr": (s.min_lr, 0, None, True, None),
        "model.drop_path_rate": (cfg.model.drop_path_rate, 0, 1, True, False),
        "train.ema_decay": (cfg.train.ema_decay, 0, 1, True, False),
        "aug.label_smoothing": (a.label_smoothing, 0, 1, True, False),
        "aug.hflip": (a.hflip, 0, 1, True, True),
        "aug.re_prob": (a.re_prob, 0, 1, True, True),
        "aug.mixup": (a.mixup, 0, None, True, None),
        "aug.cutmix": (a.cutmix, 0, None, True, None),
        "aug.mixup_prob": (a.mixup_prob, 0, 1, True, True),
        "aug.mixup_switch_prob": (a.mixup_switch_prob, 0, 1, True, True),
        "aug.color_jitter": (a.color_jitter, 0, None, True, None),
        "aug.eval_crop_pct": (a.eval_crop_pct, 0, 1, False, True),
        "data.workers": (cfg.data.workers, 0, None, True, None),
        "checkpoint.every_steps": (cfg.checkpoint.every_steps, 0, None, True, None),
        "checkpoint.every_minutes": (cfg.checkpoint.every_minutes, 0, None, False, None),
    }
    for key, (value, low, high, closed_low, closed_high) in ranges.items():
        if value is None:
            continue
        below = value < low if closed_low else value <= low
        above = high is not None and (value > high if closed_high else value >= high)
        if below or above:
            left, right = "[" if closed_low else "(", "]" if closed_high else ")"
            interval = f"{left}{low}, {'inf' if high is None else high}{right}"
            raise ConfigError(f"config key '{key}' must be in {interval}; got {value}")
    pairs = {"optimizer.betas": (o.betas, "[0.9, 0.999]"), "aug.scale": (a.scale, "[0.08, 1.0]")}
    for key, (value, example) in {**pairs, "aug.ratio": (a.ratio, "[0.75, 1.333]")}.items():
        if len(value) != 2:
            raise ConfigError(f"config key '{key}' expects two numbers, e.g. {example}; got {value}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"config key 'optimizer.betas' must be two numbers in [0, 1); got {o.betas}")
    if not 0 < a.scale[0] <= a.scale[1] <= 1:
        raise ConfigError(f"config key 'aug.scale' must be [min, max] with 0 < min <= max <= 1; got {a.scale}")
    if not 0 < a.ratio[0] <= a.ratio[1]:
        raise ConfigError(f"config key 'aug.ratio' must be [min, max] with 0 < min <= max; got {a.ratio}")
    if len(a.mean) != len(a.std) or min(a.std, default=0) <= 0:
        raise ConfigError(f"aug.mean and aug.std need as many values, the stds > 0; got {a.mean} and {a.std}")
    if a.auto_augment:
        check_auto_augment(a.auto_augment)
    check_optimizer_name(o.name)
    positive = {
        "model.img_size": cfg.model.img_size,
        "data.num_classes": cfg.data.num_classes,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "schedule.epochs": cfg.schedule.epochs,
        "eval.every": cfg.eval.every,
        "checkpoint.every": cfg.checkpoint.every,
        "train.log_every": cfg.train.log_every,
        "aug.re_count": a.re_count,
        "optimizer.ref_batch_size": o.ref_batch_size,
        "eval.batch_size": cfg.eval.batch_size,
        "debug.max_steps": cfg.debug.max_steps,
    }
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1; got {value}")
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs ({cfg.schedule.warmup_epochs}) exceeds schedule.epochs ({cfg.schedule.epochs})"
        )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
