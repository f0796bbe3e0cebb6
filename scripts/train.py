"""Train Atlas, or any timm model, for image classification: the paper's recipe, on one or many GPUs.

    python scripts/train.py --config scripts/configs/tiny_cpu_synthetic.yaml              # one process
    torchrun --standalone --nproc_per_node=8 scripts/train.py \\
        --config scripts/configs/table1_atlas_b16_1024.yaml --set data.root=/data/hr-in100  # one node
    sbatch scripts/slurm/train_2nodes.sbatch                                                # several nodes

`--set section.key=value` overrides a config key (the value is read as YAML); `--resume auto` continues from
output_dir/last.pt when it exists. The output folder gets config.yaml, metrics.jsonl, metrics.csv,
tensorboard/, last.pt (every checkpoint.every epochs) and best.pt (best validation top-1).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm
from trainlib import checkpoint as ckpt
from trainlib.config import Config, ConfigError, all_keys, load_config, to_dict
from trainlib.data import ResumableSampler, SeededSamples
from trainlib.logger import MetricsLogger
from trainlib.pipeline import DevicePrefetcher, DeviceStage, SourceCenterCrop, SourceCrop, collate_crops, erasing_seed

import atlas  # noqa: F401  (registers the Atlas models with timm)
from atlas.datasets import build_dataset, collate_skip_unreadable


class TrainingError(RuntimeError):
    """A problem the user can fix (data, model name, diverged run): reported without a traceback."""


PREEMPTED = 75  # exit status after saving on SIGTERM/SIGUSR1 (EX_TEMPFAIL): run again with --resume auto


def requeue_slurm_job(enabled: bool, log) -> None:
    """Under SLURM (SLURM_JOB_ID set), put this job back in the queue: it runs again with --resume auto."""
    job = os.environ.get("SLURM_JOB_ID")
    if not (enabled and job):
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log(f"requeued SLURM job {job}")
    else:
        log(f"warning: scontrol requeue {job} failed: {(result.stderr or result.stdout).strip()}")


class Preemption:
    """Remembers a SIGTERM or SIGUSR1 (a scheduler about to stop the job) until the next step boundary."""

    def __init__(self):
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._received)

    def _received(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (defaults in scripts/trainlib/config.py): " + ", ".join(all_keys()),
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. scripts/configs/tiny_cpu_synthetic.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set optimizer.lr=1e-3 train.batch_size=16",
    )
    parser.add_argument("--resume", help="a checkpoint to continue from, or 'auto' for output_dir/last.pt if present")
    return parser.parse_args(argv)


# -- building blocks ---------------------------------------------------------------------------------------


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


def load_dataset(cfg: Config, split: str, transform):
    """The split of the configured dataset; a missing path or wrong layout becomes a TrainingError."""
    options = dict(num_classes=cfg.data.num_classes, **cfg.data.kwargs)
    if cfg.data.root is not None:
        options["root"] = cfg.data.root
    if cfg.data.name == "imagefolder":  # decode to as many channels as the model takes
        options.setdefault("channels", cfg.model.kwargs.get("in_chans", 3))
    try:
        return build_dataset(cfg.data.name, split, transform, **options)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(f"data ({cfg.data.name}, {split}): {e}") from None


def build_model(cfg: Config) -> nn.Module:
    """A timm model (Atlas included) at cfg.model.img_size, or FasterViT through the optional fastervit package."""
    m = cfg.model
    kwargs = dict(num_classes=cfg.data.num_classes, drop_path_rate=m.drop_path_rate, **m.kwargs)
    if m.name.startswith("fastervit/"):
        try:
            import fastervit
        except ImportError:
            raise TrainingError(f"model {m.name} needs the optional package fastervit: pip install fastervit") from None
        return fastervit.create_model(m.name.removeprefix("fastervit/"), resolution=[m.img_size] * 2, **kwargs)
    if not timm.is_model(m.name):
        close = difflib.get_close_matches(m.name, timm.list_models(), n=3)
        raise TrainingError(
            f"unknown model {m.name!r}; expected a timm model name (closest: {', '.join(close) or 'none'}) "
            f"or fastervit/<name>. Atlas models: {', '.join(timm.list_models('atlas*'))}"
        )
    try:
        try:
            return timm.create_model(m.name, img_size=m.img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(m.name, **kwargs)  # convolutional models take any input size
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


def setup_distributed(device_name: str, rank: int, world: int) -> torch.device:
    """The device of this process; under torchrun also the process group (NCCL on GPUs, gloo on CPU)."""
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainingError("train.device is cuda but no GPU is visible")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        assert dist.get_rank() == rank and dist.get_world_size() == world
    return device


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def device_batches(loader: DataLoader, device: torch.device, stage: DeviceStage | None, first_seed: int = 0):
    """(images, labels, skipped) on ``device``: moved there (`exact`), or resized there by ``stage`` (`fast`)."""
    if stage is not None:
        yield from DevicePrefetcher(loader, stage, first_seed)
        return
    for images, labels, skipped in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True), skipped


def evaluate(model: nn.Module, batches, device: torch.device, autocast, channels_last: bool) -> dict:
    """Top-1, top-5 (%) and cross-entropy over this rank's shard, summed over all ranks."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images, skipped
    for images, labels, skipped in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        counts = torch.tensor([len(labels), skipped], device=device)
        sums += torch.stack([loss, hits[:, 0].sum(), hits.any(1).sum(), *counts])
    loss, top1, top5, count, skipped = all_reduce(sums).tolist()
    if count == 0:
        raise TrainingError("the validation set yielded no readable images")
    metrics = {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count}
    return {**metrics, "skipped": int(skipped), "images": int(count)}


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated this epoch, or on CPU the peak resident memory of the process (rank 0)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the run -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, [kv for group in args.overrides for kv in group])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0
    log = partial(print, flush=True) if master else (lambda *a, **k: None)
    out_dir = Path(cfg.output_dir)
    bs, accum, epochs = cfg.train.batch_size, cfg.train.grad_accum, cfg.schedule.epochs
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic

    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise TrainingError("logging.wandb is true but wandb is not installed: pip install wandb")

    # Data first, so that a wrong path or layout fails before any work starts.
    fast = cfg.data.pipeline == "fast"
    train_tf, val_tf = build_transforms(cfg)
    train_set, val_set = load_dataset(cfg, "train", train_tf), load_dataset(cfg, "val", val_tf)
    train_sampler = ResumableSampler(len(train_set), rank, world, cfg.seed)
    steps_per_epoch = train_sampler.per_rank // bs // accum
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(train_set)} training images are fewer than one optimizer step needs "
            f"(batch_size {bs} x {world} processes x grad_accum {accum})"
        )
    resume = None
    if args.resume == "auto":
        resume = out_dir / "last.pt" if (out_dir / "last.pt").exists() else None
    elif args.resume:
        resume = Path(args.resume)
        if not resume.is_file():
            raise TrainingError(f"--resume {resume}: no such checkpoint (pass a last.pt path or 'auto')")
    elif (out_dir / "last.pt").exists():
        raise TrainingError(
            f"{out_dir} already holds a run (last.pt): pass --resume auto to continue it, or choose another output_dir"
        )

    device = setup_distributed(cfg.train.device, rank, world)
    cuda = device.type == "cuda"

    # Model: identical initial weights on every rank; SyncBatchNorm (the Atlas stem) on several GPUs.
    torch.manual_seed(cfg.seed)
    raw_model = build_model(cfg)
    if cfg.train.grad_checkpointing:
        if not hasattr(raw_model, "set_grad_checkpointing"):
            raise TrainingError(f"{cfg.model.name} has no set_grad_checkpointing(); set train.grad_checkpointing=false")
        raw_model.set_grad_checkpointing(True)
    if cuda and world > 1 and cfg.train.sync_bn:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    state = None
    if resume:
        try:
            state = ckpt.load(resume)
            ckpt.check_training_state(state, raw_model, resume)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    if state:
        raw_model.load_state_dict(state["model"])
    raw_model.to(device)
    if cfg.train.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(raw_model, device_ids=[device.index] if cuda else None) if world > 1 else raw_model
    if cfg.train.compile:
        model = torch.compile(model)
    ema = ModelEmaV3(raw_model, decay=cfg.train.ema_decay) if cfg.train.ema else None

    # Optimizer (AdamW, no weight decay on norms and biases), per-step schedule, loss, mixed precision.
    global_batch = bs * world * accum
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
        optimizer, lr_schedule(lr, s.warmup_lr, s.min_lr, warmup_steps, epochs * steps_per_epoch)
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
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if cuda else None
    autocast = partial(torch.autocast, "cuda", dtype=amp_dtype) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # Resume: everything an uninterrupted run would have at this point, data position included.
    start_epoch, start_step, global_step, best_top1, elapsed = 0, 0, 0, -1.0, 0.0
    if state:
        if state["global_batch"] != global_batch:
            raise TrainingError(
                f"{resume} was written with a global batch of {state['global_batch']}, this run has "
                f"{global_batch} (batch_size x processes x grad_accum); resume with the same global batch"
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        best_top1, elapsed = state["best_top1"], state["elapsed_s"]

    # Data loaders: the training order comes from the resumable sampler, validation is sharded by rank.
    workers = cfg.data.workers
    resamples = hasattr(train_set, "set_epoch")  # a dataset that draws new samples every epoch
    loader_args = dict(
        num_workers=workers,
        pin_memory=cuda,
        collate_fn=collate_crops if fast else collate_skip_unreadable,
        persistent_workers=workers > 0 and not resamples,  # persistent workers would keep epoch 0's copy
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    train_loader = DataLoader(SeededSamples(train_set), bs, sampler=train_sampler, drop_last=True, **loader_args)
    val_shard = Subset(val_set, range(rank, len(val_set), world))
    val_loader = DataLoader(val_shard, cfg.eval.batch_size or bs, drop_last=cfg.eval.drop_last, **loader_args)
    train_stage = val_stage = None
    if fast:  # the trainer's half of the fast pipeline: resize, normalise (and erase) on this device
        norm = dict(img_size=cfg.model.img_size, mean=a.mean, std=a.std, device=device)
        train_stage = DeviceStage(**norm, re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count)
        val_stage = DeviceStage(**norm)

    n_params = sum(p.numel() for p in raw_model.parameters())
    logger = None
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in ckpt.remove_stale_temporaries(out_dir):
            log(f"removed {path.name}, left by a save that was killed")
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        wandb_project = cfg.logging.wandb_project if cfg.logging.wandb else None
        logger = MetricsLogger(out_dir, resume is not None, cfg.logging.tensorboard, wandb_project, to_dict(cfg))
        logger.log(
            "run",
            description=cfg.description,
            paper_table=cfg.paper_table,
            paper_row=cfg.paper_row,
            paper_top1=cfg.paper_top1,
            model=cfg.model.name,
            img_size=cfg.model.img_size,
            params=n_params,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            world_size=world,
            eval_every=cfg.eval.every,
            eval_drop_last=cfg.eval.drop_last,
            global_batch=global_batch,
            lr=lr,
            device=str(device),
            resumed_from=str(resume) if resume else None,
            step=global_step,
        )
    log(f"{cfg.model.name} ({n_params / 1e6:.1f}M parameters) at {cfg.model.img_size}px on {world} x {device.type}")
    log(
        f"{len(train_set)} train / {len(val_set)} val images, {steps_per_epoch} steps per epoch, "
        f"global batch {global_batch}, lr {lr:.3g} (config lr {cfg.optimizer.lr:g} at batch {ref_batch})"
    )
    if resume:
        log(f"resumed from {resume}: epoch {start_epoch + 1}, step {global_step}")

    def save_checkpoint(epoch: int, step_in_epoch: int, progress: dict | None = None) -> None:
        """last.pt, atomically; `epoch`/`step_in_epoch` say where training continues (called on all ranks);
        `progress`: the epoch's running sums so far, when saved in the middle of it."""
        rng = gather_objects(ckpt.rng_state(), world)
        bad = [name for name, p in raw_model.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
        if bad:  # never store non-finite weights as the point to resume from
            raise TrainingError(f"refusing to write {out_dir / 'last.pt'}: non-finite values in {', '.join(bad[:3])}")
        if master:
            ckpt.atomic_save(
                {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "ema": ema.state_dict() if ema else None,
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "global_step": global_step,
                    "global_batch": global_batch,
                    "best_top1": best_top1,
                    "elapsed_s": time.time() - run_clock,
                    "rng": rng,
                    "world_size": world,
                    "epoch_progress": progress or {},
                    "config": to_dict(cfg),
                },
                out_dir / "last.pt",
            )

    if start_epoch >= epochs:
        log(f"{resume} already finished all {epochs} epochs; nothing to do")
        return
    if state and state["world_size"] == world:
        ckpt.set_rng_state(state["rng"][rank])
    else:
        seed_everything(cfg.seed + rank)  # each rank its own drop-path and mixup randomness
        if state:
            log(
                f"warning: {resume} comes from {state['world_size']} processes, this run has {world}: "
                "random streams and the data order differ from an uninterrupted run"
            )
    run_clock = time.time() - elapsed  # training time, accumulated over resumed runs
    preemption, last_save = Preemption(), time.time()

    # The training loop: epochs of `steps_per_epoch` optimizer steps of `grad_accum` micro-batches each.
    for epoch in range(start_epoch, epochs):
        epoch_start = time.time()
        first_step = start_step if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, skip=first_step * accum * bs)
        if resamples:
            train_set.set_epoch(epoch)
        batches = device_batches(train_loader, device, train_stage, erasing_seed(cfg.seed, epoch, first_step * accum))
        model.train()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        loss_sum, steps_done, images_seen, skipped = 0.0, 0, 0, 0
        # Resumed in the middle of this epoch: its loss so far, so that train_loss averages the whole epoch.
        prior = state.get("epoch_progress", {}) if state and epoch == start_epoch else {}
        prior_loss, prior_steps = prior.get("loss_sum", 0.0), prior.get("steps", 0)
        stop = mid_epoch = False
        bar = tqdm(
            total=steps_per_epoch,
            initial=first_step,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            disable=not master,
            dynamic_ncols=True,
        )
        for step_in_epoch in range(first_step, steps_per_epoch):
            loss_acc = torch.zeros((), device=device)
            for micro in range(accum):
                images, labels, n_skipped = next(batches)
                skipped += n_skipped
                if cfg.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if mixup:
                    if len(images) % 2:  # mixup pairs images; a skipped unreadable one made the batch odd
                        images, labels = images[:-1], labels[:-1]
                    images, labels = mixup(images, labels)
                images_seen += len(images)
                sync = world == 1 or micro == accum - 1  # DDP all-reduces gradients on the last micro-batch
                with nullcontext() if sync else model.no_sync():
                    with autocast():
                        loss = loss_fn(model(images), labels)
                    if cfg.debug.nan_at_step == global_step + 1:
                        loss = loss * float("nan")
                    (scaler.scale(loss / accum) if scaler else loss / accum).backward()
                    if cfg.debug.nan_grad_at_step == global_step + 1:
                        next(p for p in raw_model.parameters() if p.grad is not None).grad.fill_(float("nan"))
                loss_acc += loss.detach().float() / accum
            # One all-reduce per step: the loss, a signal on any rank, and rank 0's checkpoint clock.
            due = master and (time.time() - last_save) / 60 >= cfg.checkpoint.every_minutes
            requests = torch.tensor([preemption.signal is not None, due], device=device, dtype=loss_acc.dtype)
            loss_total, preempted, due = all_reduce(torch.cat([loss_acc.view(1), requests])).tolist()
            step_loss = loss_total / world  # the mean over ranks; NaN if any rank has NaN
            if not math.isfinite(step_loss):
                bar.close()
                last = out_dir / "last.pt"
                raise TrainingError(
                    f"non-finite loss ({step_loss}) at optimizer step {global_step + 1} (epoch {epoch + 1}); "
                    "stopped before updating the weights. Last good checkpoint: "
                    f"{last if last.exists() else 'none written yet'}. "
                    "Try a lower optimizer.lr or set optimizer.clip_grad."
                )
            if scaler:
                scaler.unscale_(optimizer)
            # The gradient norm (clipping computes it anyway); DDP's gradients, and so it, are equal on all ranks.
            grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optimizer.clip_grad or math.inf).item()
            if not math.isfinite(grad_norm) and not scaler:  # fp16's scaler skips such steps by itself
                bar.close()
                raise TrainingError(
                    f"non-finite gradient norm ({grad_norm}) with a finite loss at optimizer step {global_step + 1} "
                    f"(epoch {epoch + 1}); stopped before updating the weights. Last good checkpoint: "
                    f"{out_dir / 'last.pt' if (out_dir / 'last.pt').exists() else 'none written yet'}. "
                    "Try a lower optimizer.lr, optimizer.clip_grad, or train.amp=none to find the layer."
                )
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            global_step += 1
            if ema is not None:
                ema.update(raw_model, step=global_step)
            loss_sum, steps_done = loss_sum + step_loss, steps_done + 1

            images_per_s = images_seen * world / (time.time() - epoch_start)
            current_lr = optimizer.param_groups[0]["lr"]
            eta_h = (epochs * steps_per_epoch - global_step) * (time.time() - epoch_start) / steps_done / 3600
            bar.set_postfix(
                loss=f"{step_loss:.4f}",
                lr=f"{current_lr:.2e}",
                img_s=f"{images_per_s:.1f}",
                run_eta=f"{eta_h:.2f}h",
                refresh=False,
            )
            bar.update()
            if master and global_step % cfg.train.log_every == 0:
                logger.log(
                    "step", step=global_step, epoch=epoch + 1, loss=step_loss, lr=current_lr, images_per_s=images_per_s
                )

            stop = cfg.debug.max_steps is not None and global_step >= cfg.debug.max_steps
            mid_epoch = step_in_epoch + 1 < steps_per_epoch
            every = cfg.checkpoint.every_steps
            progress = dict(loss_sum=prior_loss + loss_sum, steps=prior_steps + steps_done)
            if preempted:  # all ranks agree (above); this step's state, even at the epoch's last step
                save_checkpoint(epoch, step_in_epoch + 1, progress)
                bar.close()
                log(
                    f"{preemption.signal or 'a signal on another rank'}: saved {out_dir / 'last.pt'} after step "
                    f"{global_step}; --resume auto continues (exit status {PREEMPTED})"
                )
                if master:
                    logger.close()
                    requeue_slurm_job(cfg.checkpoint.requeue, log)
                raise SystemExit(PREEMPTED)
            if mid_epoch and (stop or due or (every and global_step % every == 0)):
                save_checkpoint(epoch, step_in_epoch + 1, progress)
                last_save = time.time()
            if stop:
                break
        bar.close()
        if stop and mid_epoch:
            log(f"stopped after step {global_step} (debug.max_steps); --resume {out_dir / 'last.pt'} continues")
            break

        # End of epoch: metrics, evaluation, checkpoints.
        counts = all_reduce(torch.tensor([images_seen, skipped], dtype=torch.float64, device=device)).tolist()
        train_time = time.time() - epoch_start
        record = dict(
            epoch=epoch + 1,
            step=global_step,
            train_loss=(prior_loss + loss_sum) / (prior_steps + steps_done),
            lr=optimizer.param_groups[0]["lr"],
            epoch_time_s=train_time,
            images_per_s=counts[0] / train_time,
            peak_mem_gb=peak_memory_gb(device),
            skipped_images=int(counts[1]),
        )
        if counts[1]:
            log(f"warning: skipped {int(counts[1])} unreadable training images in epoch {epoch + 1}")
        last_epoch = epoch + 1 == epochs
        if (epoch + 1) % cfg.eval.every == 0 or last_epoch or stop:
            metrics = evaluate(
                raw_model, device_batches(val_loader, device, val_stage), device, autocast, cfg.train.channels_last
            )
            record.update(
                val_top1=metrics["top1"],
                val_top5=metrics["top5"],
                val_loss=metrics["loss"],
                val_skipped_images=metrics["skipped"],
                val_images=metrics["images"],
            )
            score = metrics["top1"]
            if ema is not None:
                ema_metrics = evaluate(
                    ema.module, device_batches(val_loader, device, val_stage), device, autocast, cfg.train.channels_last
                )
                record.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
                score = ema_metrics["top1"]  # with EMA, model selection uses the EMA weights
            if score > best_top1:
                best_top1 = score
                if master:
                    ckpt.atomic_save(
                        {
                            "model": raw_model.state_dict(),
                            "ema": ema.state_dict() if ema else None,
                            "epoch": epoch + 1,
                            "top1": score,
                            "config": to_dict(cfg),
                        },
                        out_dir / "best.pt",
                    )
            record["best_top1"] = best_top1
        record["elapsed_h"] = (time.time() - run_clock) / 3600
        if (epoch + 1) % cfg.checkpoint.every == 0 or last_epoch or stop:
            save_checkpoint(epoch + 1, 0)
            last_save = time.time()
        if master:
            logger.log("epoch", **record)
        summary = f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}"
        if "val_top1" in record:
            summary += f", val top-1 {record['val_top1']:.2f}% top-5 {record['val_top5']:.2f}%"
        if "ema_top1" in record:
            summary += f", EMA top-1 {record['ema_top1']:.2f}%"
        log(f"{summary}, {record['images_per_s']:.1f} img/s, {train_time:.1f} s")
        if stop:
            log(f"stopped after step {global_step} (debug.max_steps)")
            break
    else:
        if master:
            logger.log(
                "final",
                step=global_step,
                epochs=epochs,
                best_top1=best_top1,
                final_top1=record["val_top1"],
                elapsed_h=record["elapsed_h"],
            )
        log(f"done: best top-1 {best_top1:.2f}%, {record['elapsed_h']:.2f} h; checkpoints in {out_dir}")
    if master:
        logger.close()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, TrainingError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
