"""What a training run builds from its config: the data transforms, the model, the model to train (EMA, DDP,
compiled) and the optimization (AdamW, schedule, loss, mixup, mixed precision). scripts/train.py runs with them;
the scripts that time or compare configs as training builds them (paper_speed.py, benchmark.py, benchmark_data.py,
compare_results.py, demo.py) build with them too.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import baselines  # registers the baselines of Tables 1-3 with timm (scripts/baselines)
import timm
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import atlas  # noqa: F401  (registers the Atlas models with timm)
from atlas.profiling import create_at_size

from . import checkpoint as ckpt
from .compiling import compile_model
from .config import Config
from .pipeline import SourceCenterCrop, SourceCrop


class TrainingError(RuntimeError):
    """A problem the user can fix (data, model name, diverged run): reported without a traceback."""


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, with 0 bits giving a black image as older Pillow did: recent Pillow rejects 0 bits,
    which RandAugment's 'inc1' posterize reaches at magnitude 10 (m9 plus the mstd0.5 noise)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def build_transforms(cfg: Config):
    """The workers' transforms (train, val): timm's at the input size (`exact`), or uint8 source crops (`fast`)."""
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize
    a = cfg.aug
    in_chans = cfg.model.kwargs.get("in_chans", 3)
    if len(a.mean) != in_chans or len(a.std) != in_chans:
        raise TrainingError(
            f"aug.mean and aug.std need one value per input channel ({in_chans}), got {list(a.mean)} and "
            f"{list(a.std)}" + (", e.g. aug.mean=[0.5] aug.std=[0.5]" if in_chans == 1 else "")
        )
    if cfg.data.pipeline == "fast":
        if a.color_jitter or a.eval_crop_mode != "squash":
            raise TrainingError(
                "data.pipeline=fast supports aug.color_jitter: null and aug.eval_crop_mode: squash only; "
                f"got {a.color_jitter} and {a.eval_crop_mode!r} (use data.pipeline=exact)"
            )
        try:
            train = SourceCrop(a.scale, a.ratio, a.hflip, a.auto_augment, a.interpolation, a.mean)
            return train, SourceCenterCrop(a.eval_crop_pct)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    norm = dict(mean=tuple(a.mean), std=tuple(a.std), interpolation=a.interpolation)
    train = create_transform(
        cfg.model.img_size,
        is_training=True,
        auto_augment=a.auto_augment,
        color_jitter=a.color_jitter,
        scale=tuple(a.scale),
        ratio=tuple(a.ratio),
        hflip=a.hflip,
        re_prob=a.re_prob,
        re_mode=a.re_mode,
        re_count=a.re_count,
        **norm,
    )
    val = create_transform(
        cfg.model.img_size, is_training=False, crop_pct=a.eval_crop_pct, crop_mode=a.eval_crop_mode, **norm
    )
    return train, val


def build_model(cfg: Config) -> nn.Module:
    """A timm model (Atlas and scripts/baselines included) at cfg.model.img_size, or <package>/<name> of an
    optional package (baselines.OPTIONAL_PACKAGES: fastervit, mambavision)."""
    m = cfg.model
    kwargs = dict(num_classes=cfg.data.num_classes, drop_path_rate=m.drop_path_rate, **m.kwargs)
    if m.name.partition("/")[0] in baselines.OPTIONAL_PACKAGES:
        try:
            return baselines.create_optional(m.name, m.img_size, **kwargs)
        except (ImportError, ValueError) as e:
            raise TrainingError(str(e)) from None
    if not timm.is_model(m.name):
        close = difflib.get_close_matches(m.name, timm.list_models(), n=3)
        packages = ", ".join(f"{p}/<name>" for p in baselines.OPTIONAL_PACKAGES)
        raise TrainingError(
            f"unknown model {m.name!r}; expected a timm model name (closest: {', '.join(close) or 'none'}) "
            f"or {packages}. Atlas models: {', '.join(timm.list_models('atlas*'))}"
        )
    try:
        return create_at_size(m.name, m.img_size, **kwargs)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"cannot build {m.name} with model.kwargs {m.kwargs}: {e}") from None


def lr_schedule(lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    """Per-step factor of `lr` for LambdaLR: linear warm-up from warmup_lr, then cosine down to min_lr."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (warmup_lr + (lr - warmup_lr) * step / warmup_steps) / lr
        progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr

    return factor


@dataclass
class Optimization:
    """AdamW (no weight decay on norms and biases), its per-step schedule, the loss, mixup, mixed precision."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    mixup: Mixup | None
    autocast: Callable
    scaler: torch.amp.GradScaler | None
    lr: float  # the peak learning rate, scaled to the global batch
    global_batch: int


def compile_mode(setting: str, model: nn.Module, device: torch.device) -> str:
    """``train.compile`` as a mode of :func:`trainlib.compiling.compile_model`. "auto" is what measured fastest
    (docs/benchmarks.md): an Atlas model on a GPU compiles block by block ("regional": on one H200, 1.27x the
    eager images/s of Atlas-B/16 at 1024px and 1.30x at 2048px, with a first step half as long as a whole-model
    compilation's); other models, and CPUs, where compiling takes minutes, run eager."""
    if setting != "auto":
        return setting
    return "regional" if device.type == "cuda" and hasattr(model, "compile_regions") else "none"


def build_training_model(cfg: Config, device: torch.device, distributed: bool, resume: Path | None):
    """(raw model, model to train, EMA, resumed state): identical initial weights on every rank, SyncBatchNorm
    on GPUs under torchrun, the checkpoint's weights when resuming, DDP and torch.compile where configured."""
    torch.manual_seed(cfg.seed)
    raw_model = build_model(cfg)
    if cfg.train.grad_checkpointing:
        if not hasattr(raw_model, "set_grad_checkpointing"):
            raise TrainingError(f"{cfg.model.name} has no set_grad_checkpointing(); set train.grad_checkpointing=false")
        raw_model.set_grad_checkpointing(True)
    cuda = device.type == "cuda"
    if cuda and distributed and cfg.train.sync_bn:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    state = None
    if resume:
        try:
            state = ckpt.load(resume)
            ckpt.check_training_state(state, raw_model, resume)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        raw_model.load_state_dict(state["model"])
    raw_model.to(device)
    if cfg.train.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(raw_model, decay=cfg.train.ema_decay) if cfg.train.ema else None  # before compiling in place
    mode = compile_mode(cfg.train.compile, raw_model, device)
    if mode == "regional":  # in place, block by block: DDP then wraps the compiled blocks
        compile_model(raw_model, mode)
    model = raw_model
    if distributed:  # under torchrun, also with one process: what runs on one GPU runs on eight
        model = DistributedDataParallel(raw_model, device_ids=[device.index] if cuda else None)
    if mode == "full":
        model = compile_model(model, mode)
    return raw_model, model, ema, state


def build_optimization(cfg: Config, raw_model: nn.Module, steps_per_epoch: int, world: int, device) -> Optimization:
    global_batch = cfg.train.batch_size * world * cfg.train.grad_accum
    ref_batch = cfg.optimizer.ref_batch_size
    lr = cfg.optimizer.lr * global_batch / ref_batch if ref_batch else cfg.optimizer.lr
    optimizer = create_optimizer_v2(
        raw_model,
        opt=cfg.optimizer.name,
        lr=lr,
        weight_decay=cfg.optimizer.weight_decay,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
    )
    s = cfg.schedule
    warmup_steps = round(s.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(lr, s.warmup_lr, s.min_lr, warmup_steps, s.epochs * steps_per_epoch)
    )
    a = cfg.aug
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=a.mixup,
            cutmix_alpha=a.cutmix,
            prob=a.mixup_prob,
            switch_prob=a.mixup_switch_prob,
            mode=a.mixup_mode,
            label_smoothing=a.label_smoothing,
            num_classes=cfg.data.num_classes,
        )
    loss_fn = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if device.type == "cuda" else None
    autocast = partial(torch.autocast, "cuda", dtype=amp_dtype) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return Optimization(optimizer, scheduler, loss_fn, mixup, autocast, scaler, lr, global_batch)
