"""Train Atlas, or any timm model, for image classification: the paper's recipe, on one or many GPUs.

    python scripts/train.py --config scripts/configs/tiny_cpu_synthetic.yaml              # one process
    python scripts/train.py --nproc-per-node 8 \\
        --config scripts/configs/table1_atlas_b16_1024.yaml --set data.root=/data/hr-in100  # one node
    torchrun --standalone --nproc_per_node=8 scripts/train.py --config ...                  # the same
    sbatch scripts/slurm/train_2nodes.sbatch                                                # several nodes

`--set section.key=value` overrides a config key (the value is read as YAML); `--resume auto` continues from
output_dir/last.pt when it exists. The output folder gets config.yaml, metrics.jsonl, metrics.csv,
tensorboard/, last.pt (every checkpoint.every epochs) and best.pt (best validation top-1). A folder that holds
any of these is never started over silently: continue it with --resume auto, or pass --overwrite to replace it.
Ctrl-C, SIGTERM and SIGUSR1 save last.pt after the step in progress and exit (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm
from trainlib import checkpoint as ckpt
from trainlib.building import (
    Optimization,
    TrainingError,
    build_optimization,
    build_training_model,
    build_transforms,
)
from trainlib.config import Config, ConfigError, all_keys, load_config, to_dict
from trainlib.data import ResumableSampler, SeededSamples
from trainlib.evaluation import all_reduce, evaluate, load_dataset
from trainlib.logger import MetricsLogger
from trainlib.pipeline import DevicePrefetcher, DeviceStage, collate_crops, erasing_seed

import atlas  # noqa: F401  (registers the Atlas models with timm)
from atlas.datasets import collate_skip_unreadable

PREEMPTED = 75  # exit status after saving on SIGTERM/SIGUSR1 (EX_TEMPFAIL): run again with --resume auto
INTERRUPTED = 130  # exit status after Ctrl-C (SIGINT), saved or not (128 + SIGINT, as a shell reports it)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "config.yaml", "tensorboard")  # a run's output


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
    """Remembers a SIGTERM or SIGUSR1 (a scheduler about to stop the job) or a Ctrl-C (SIGINT) until the next step
    boundary, where the run saves and exits. A second Ctrl-C stops at once (KeyboardInterrupt), without saving."""

    def __init__(self):
        self.signal: str | None = None
        self.interrupts = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._received)

    def _received(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            if int(os.environ.get("RANK", 0)) == 0:  # os.write: print() may be busy with the progress bar
                os.write(2, b"\nCtrl-C: saving after this step (press it again to stop at once, without saving)\n")
        self.signal = self.signal or signal.Signals(signum).name


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C (a terminal sends it to them too): the trainer saves, then stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that already holds a run: its last.pt, best.pt, metrics and logs are deleted",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="start N training processes on this machine (one per GPU), as torchrun --standalone would",
    )
    return parser.parse_args(argv)


def launch_local(nproc: int, argv: list[str]) -> int:
    """``--nproc-per-node N``: N processes of this script on this machine; returns the job's exit status.

    Each worker gets the environment torchrun gives it (RANK, WORLD_SIZE, MASTER_ADDR, ...). Rank 0 reports an
    error in one line and nothing is added to it (torchrun appends its own report of the failed child). SIGTERM
    and SIGUSR1 are passed on, so that the workers save and exit with PREEMPTED, and so is Ctrl-C (the workers
    have their own process group, so that a terminal's Ctrl-C reaches them once, through here); when one worker
    fails, the others are stopped after a few seconds (they may be waiting for it in a collective).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    own_group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, *argv],
            env={**os.environ, **job, "RANK": str(r), "LOCAL_RANK": str(r)},
            **own_group,
        )
        for r in range(nproc)
    ]
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: [w.send_signal(signum) for w in workers if w.poll() is None])
    failed_at = None
    while any(w.poll() is None for w in workers):
        if failed_at is None and any(w.returncode for w in workers):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > 5:
            for w in workers:
                if w.poll() is None:
                    w.terminate()
        time.sleep(0.2)
    exits = [w.returncode for w in workers]
    own = [code for code in exits if code > 0]  # a worker's own exit status; negative: stopped by a signal
    killed = [128 - code for code in exits if code < 0]
    return (own or killed or [0])[0]


# -- building blocks ---------------------------------------------------------------------------------------


def setup_distributed(device_name: str, rank: int, world: int, distributed: bool) -> torch.device:
    """The device of this process; under torchrun (``distributed``) also the process group (NCCL on GPUs, gloo
    on CPU), with one process as with several."""
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainingError("train.device is cuda but no GPU is visible")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        assert dist.get_rank() == rank and dist.get_world_size() == world
    return device


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


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated this epoch, or on CPU the peak resident memory of the process (rank 0)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the run, step by step ---------------------------------------------------------------------------------


@dataclass
class Data:
    train_set: Dataset
    val_set: Dataset
    sampler: ResumableSampler
    train_loader: DataLoader
    val_loader: DataLoader
    train_stage: DeviceStage | None  # the fast pipeline's resize and normalise on the device (None: exact)
    val_stage: DeviceStage | None
    steps_per_epoch: int


@dataclass
class Run:
    """One training process: its place in the job, the model, optimisation, data and logs, and where it stands."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    out_dir: Path
    resume: Path | None
    state: dict | None  # the checkpoint resumed from
    raw_model: nn.Module
    model: nn.Module  # raw_model, wrapped by DDP and torch.compile where configured
    ema: ModelEmaV3 | None
    opt: Optimization
    data: Data
    logger: MetricsLogger | None = None
    overwrite: bool = False  # --overwrite: start_logs deletes the run that output_dir holds
    append_logs: bool = False  # metrics go after those already there (resuming, or restarting a checkpointless run)
    epoch: int = 0  # where training continues: epoch, step in it, optimizer steps so far
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    best_weights: str = "live"  # which weights scored best_top1: "live" or "ema"
    ema_updates: int = 0  # updates the EMA has seen (it selects the model once it has seen ema_horizon of them)
    run_clock: float = 0.0  # when this run's training time started, counting the time of the runs it resumes
    last_save: float = 0.0  # when last.pt was last written (checkpoint.every_minutes counts from it)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, *args) -> None:
        if self.master:
            print(*args, flush=True)


@dataclass
class EpochProgress:
    """The running sums of one epoch; ``prior_*`` come from the run it resumes, in the middle of the epoch."""

    prior_loss: float = 0.0
    prior_steps: int = 0
    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    skipped: int = 0
    stop: bool = False  # debug.max_steps reached
    mid_epoch: bool = False  # stopped before the epoch's last step
    seconds: float = 0.0

    def saved(self) -> dict:
        return dict(loss_sum=self.prior_loss + self.loss_sum, steps=self.prior_steps + self.steps)

    def mean_loss(self) -> float:
        return (self.prior_loss + self.loss_sum) / (self.prior_steps + self.steps)


def run_files(out_dir: Path) -> list[str]:
    """The names of RUN_FILES that ``out_dir`` holds: a run lives there if there is any."""
    return [name for name in RUN_FILES if (out_dir / name).exists()] if out_dir.is_dir() else []


def check_output_dir(out_dir: Path) -> None:
    """TrainingError unless ``out_dir`` is a folder, or can be made one, that this process can write to."""
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out_dir.absolute() else f"is under {existing}, which is a file"
        raise TrainingError(f"output_dir {out_dir} {where}; set output_dir to a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):  # what counts is whether a file can be made there
            pass
    except OSError as e:
        raise TrainingError(f"output_dir {out_dir}: cannot write to {existing} ({e.strerror})") from None


def find_resume(resume: str | None, out_dir: Path, overwrite: bool = False) -> Path | None:
    """The checkpoint to continue from: ``--resume PATH``, ``--resume auto`` (last.pt if there), or none.

    A run's files in ``out_dir`` (RUN_FILES) are never replaced silently: without a last.pt to continue from,
    the run needs ``--overwrite`` to start over there. One exception keeps requeued jobs going: ``--resume auto``
    in a folder whose run was stopped before it saved any checkpoint (no last.pt, no best.pt) starts that run
    again, and its metrics are appended to, not replaced (see :func:`started_without_checkpoint`).
    """
    found = run_files(out_dir)
    listed = ", ".join(found)
    if overwrite:
        if resume:
            raise TrainingError("--overwrite starts over, --resume continues: pass one of them")
        return None
    if resume == "auto":
        if (out_dir / "last.pt").exists():
            return out_dir / "last.pt"
        if found and not started_without_checkpoint(out_dir):
            raise TrainingError(
                f"{out_dir} holds a run without last.pt ({listed}): nothing to resume; pass --overwrite to start "
                "over there (deleting those files), or choose another output_dir"
            )
        return None
    if resume:
        path = Path(resume)
        if not path.is_file():
            raise TrainingError(f"--resume {resume}: no such checkpoint (pass a last.pt path or 'auto')")
        if found and path.resolve() != (out_dir / "last.pt").resolve():
            raise TrainingError(
                f"{out_dir} already holds another run ({listed}); continuing {resume} there would mix the two: "
                "choose another output_dir"
            )
        return path
    if found:
        hint = "--resume auto continues it, " if "last.pt" in found else ""
        raise TrainingError(
            f"{out_dir} already holds a run ({listed}): {hint}--overwrite starts over there (deleting those "
            "files), or choose another output_dir"
        )
    return None


def started_without_checkpoint(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run that stopped before its first checkpoint: run files, but no .pt file."""
    found = run_files(out_dir)
    return bool(found) and not any(name.endswith(".pt") for name in found)


def build_data(cfg: Config, train_set, val_set, sampler, steps_per_epoch, rank, world, device) -> Data:
    """Loaders: the training order from the resumable sampler, validation sharded by rank."""
    fast, workers, cuda = cfg.data.pipeline == "fast", cfg.data.workers, device.type == "cuda"
    loader_args = dict(
        num_workers=workers,
        pin_memory=cuda,
        collate_fn=collate_crops if fast else collate_skip_unreadable,
        # persistent workers would keep epoch 0's copy of a dataset that draws new samples every epoch
        persistent_workers=workers > 0 and not hasattr(train_set, "set_epoch"),
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=ignore_interrupts,
    )
    bs = cfg.train.batch_size
    train_loader = DataLoader(SeededSamples(train_set), bs, sampler=sampler, drop_last=True, **loader_args)
    val_shard = Subset(val_set, range(rank, len(val_set), world))
    val_loader = DataLoader(val_shard, cfg.eval.batch_size or bs, drop_last=cfg.eval.drop_last, **loader_args)
    train_stage = val_stage = None
    if fast:  # the trainer's half of the fast pipeline: resize, normalise (and erase) on this device
        a = cfg.aug
        norm = dict(img_size=cfg.model.img_size, mean=a.mean, std=a.std, device=device)
        train_stage = DeviceStage(**norm, re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count)
        val_stage = DeviceStage(**norm)
    return Data(train_set, val_set, sampler, train_loader, val_loader, train_stage, val_stage, steps_per_epoch)


def setup(cfg: Config, resume_arg: str | None, overwrite: bool = False) -> Run:
    """Everything a run needs, checked in the order that fails fastest: output folder, data, resume point, device,
    model."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    distributed = "RANK" in os.environ  # started by torchrun or --nproc-per-node
    out_dir = Path(cfg.output_dir)
    check_output_dir(out_dir)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise TrainingError("logging.wandb is true but wandb is not installed: pip install wandb")

    # Data first, so that a wrong path or layout fails before any work starts.
    train_tf, val_tf = build_transforms(cfg)
    train_set, val_set = load_dataset(cfg, "train", train_tf), load_dataset(cfg, "val", val_tf)
    sampler = ResumableSampler(len(train_set), rank, world, cfg.seed)
    bs, accum = cfg.train.batch_size, cfg.train.grad_accum
    steps_per_epoch = sampler.per_rank // bs // accum
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(train_set)} training images are fewer than one optimizer step needs "
            f"(batch_size {bs} x {world} processes x grad_accum {accum})"
        )
    resume = find_resume(resume_arg, out_dir, overwrite)  # before init_process_group: no rank has written yet
    device = setup_distributed(cfg.train.device, rank, world, distributed)
    raw_model, model, ema, state = build_training_model(cfg, device, distributed, resume)
    opt = build_optimization(cfg, raw_model, steps_per_epoch, world, device)
    data = build_data(cfg, train_set, val_set, sampler, steps_per_epoch, rank, world, device)
    append = resume is not None or (resume_arg == "auto" and started_without_checkpoint(out_dir))
    parts = (cfg, rank, world, device, out_dir, resume, state, raw_model, model, ema, opt, data)
    return Run(*parts, overwrite=overwrite, append_logs=append)


# Config keys whose values a checkpoint's optimizer and scheduler state carries (the learning rate in the
# scheduler's base_lrs, the rest in the optimizer's param_groups): on resume the checkpoint's would be used.
OPTIMIZER_STATE_KEYS = ("name", "lr", "ref_batch_size", "weight_decay", "betas", "eps")


def restore(run: Run) -> None:
    """Resume: everything an uninterrupted run would have at this point, the data position included."""
    state, opt = run.state, run.opt
    if state is None:
        return
    if state["global_batch"] != opt.global_batch:
        raise TrainingError(
            f"{run.resume} was written with a global batch of {state['global_batch']}, this run has "
            f"{opt.global_batch} (batch_size x processes x grad_accum); resume with the same global batch"
        )
    written = state.get("config", {}).get("optimizer", {})
    for key in OPTIMIZER_STATE_KEYS:
        old, new = written.get(key), to_dict(run.cfg)["optimizer"][key]
        if key in written and old != new:
            raise TrainingError(
                f"{run.resume} was trained with optimizer.{key}={old}, this run sets {new}: its optimizer state "
                f"would keep {old}. Resume with optimizer.{key}={old}, or start a new run in another output_dir"
            )
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    if opt.scaler is not None and state["scaler"] is not None:
        opt.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.load_state_dict(state["ema"])
        run.ema_updates = state.get("ema_updates", state["global_step"])
    run.epoch, run.step_in_epoch, run.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
    run.best_top1 = state["best_top1"]
    run.best_weights = state.get("best_weights", "live")


def seed_streams(run: Run) -> None:
    """Each rank its own random streams (drop path, mixup): the checkpoint's when it comes from as many
    processes, a fresh seed per rank otherwise."""
    state = run.state
    if state and state["world_size"] == run.world:
        ckpt.set_rng_state(state["rng"][run.rank])
        return
    seed_everything(run.cfg.seed + run.rank)
    if state:
        run.log(
            f"warning: {run.resume} comes from {state['world_size']} processes, this run has {run.world}: "
            "random streams and the data order differ from an uninterrupted run"
        )


def start_logs(run: Run) -> None:
    """Rank 0: the output folder, its config.yaml and metrics logger, and what this run is, printed."""
    cfg, out_dir = run.cfg, run.out_dir
    n_params = sum(p.numel() for p in run.raw_model.parameters())
    if run.master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if run.overwrite and run_files(out_dir):
                removed = run_files(out_dir)
                for name in removed:
                    path = out_dir / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                run.log(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {out_dir}")
            for path in ckpt.remove_stale_temporaries(out_dir):
                run.log(f"removed {path.name}, left by a save that was killed")
            (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            wandb_project = cfg.logging.wandb_project if cfg.logging.wandb else None
            run.logger = MetricsLogger(out_dir, run.append_logs, cfg.logging.tensorboard, wandb_project, to_dict(cfg))
        except OSError as e:
            raise TrainingError(f"output_dir {out_dir}: {e.strerror or e} ({e.filename or out_dir})") from None
        run.logger.log(
            "run",
            description=cfg.description,
            paper_table=cfg.paper_table,
            paper_row=cfg.paper_row,
            paper_top1=cfg.paper_top1,
            model=cfg.model.name,
            img_size=cfg.model.img_size,
            params=n_params,
            epochs=cfg.schedule.epochs,
            steps_per_epoch=run.data.steps_per_epoch,
            world_size=run.world,
            process_group=dist.get_backend() if dist.is_initialized() else None,
            ddp=isinstance(getattr(run.model, "_orig_mod", run.model), DistributedDataParallel),  # compiled or not
            sync_bn=any(isinstance(m, nn.SyncBatchNorm) for m in run.raw_model.modules()),
            eval_every=cfg.eval.every,
            eval_drop_last=cfg.eval.drop_last,
            global_batch=run.opt.global_batch,
            lr=run.opt.lr,
            device=str(run.device),
            resumed_from=str(run.resume) if run.resume else None,
            step=run.global_step,
        )
    where = f"{cfg.model.img_size}px on {run.world} x {run.device.type}"
    run.log(f"{cfg.model.name} ({n_params / 1e6:.1f}M parameters) at {where}")
    run.log(
        f"{len(run.data.train_set)} train / {len(run.data.val_set)} val images, {run.data.steps_per_epoch} steps per "
        f"epoch, global batch {run.opt.global_batch}, lr {run.opt.lr:.3g} (config lr {cfg.optimizer.lr:g} at batch "
        f"{cfg.optimizer.ref_batch_size})"
    )
    if run.resume:
        run.log(f"resumed from {run.resume}: epoch {run.epoch + 1}, step {run.global_step}")


def save_checkpoint(run: Run, epoch: int, step_in_epoch: int, progress: dict | None = None) -> None:
    """last.pt, atomically (called on all ranks, written by rank 0); ``epoch``/``step_in_epoch`` say where
    training continues; ``progress``: the epoch's running sums so far, when saved in the middle of it."""
    rng = gather_objects(ckpt.rng_state(), run.world)
    model_state = run.raw_model.state_dict()
    bad = [name for name, p in model_state.items() if p.is_floating_point() and not p.isfinite().all()]
    if bad:  # never store non-finite weights as the point to resume from
        raise TrainingError(f"refusing to write {run.out_dir / 'last.pt'}: non-finite values in {', '.join(bad[:3])}")
    if run.master:
        opt = run.opt
        ckpt.atomic_save(
            {
                "model": model_state,
                "optimizer": opt.optimizer.state_dict(),
                "scheduler": opt.scheduler.state_dict(),
                "scaler": opt.scaler.state_dict() if opt.scaler else None,
                "ema": run.ema.state_dict() if run.ema else None,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": run.global_step,
                "global_batch": opt.global_batch,
                "best_top1": run.best_top1,
                "best_weights": run.best_weights,
                "ema_updates": run.ema_updates,
                "elapsed_s": time.time() - run.run_clock,
                "rng": rng,
                "world_size": run.world,
                "epoch_progress": progress or {},
                "config": to_dict(run.cfg),
            },
            run.out_dir / "last.pt",
        )


def last_good_checkpoint(run: Run) -> str:
    last = run.out_dir / "last.pt"
    return str(last) if last.exists() else "none written yet"


def forward_backward(run: Run, batches, progress: EpochProgress) -> tuple[torch.Tensor, int]:
    """``grad_accum`` micro-batches into the gradients; returns this rank's summed loss and how many micro-batches
    it sums. A micro-batch whose images were all unreadable adds nothing (under DDP a zero-weighted pass over a
    black image keeps this rank in step with the others' gradient all-reduce)."""
    cfg, opt, accum = run.cfg, run.opt, run.cfg.train.grad_accum
    loss_sum, counted = torch.zeros((), device=run.device), 0
    for micro in range(accum):
        images, labels, n_skipped = next(batches)
        progress.skipped += n_skipped
        if opt.mixup and len(images) % 2:  # mixup pairs images; a skipped unreadable one made the batch odd
            images, labels = images[:-1], labels[:-1]
        if len(images) == 0 and not dist.is_initialized():
            continue
        weight = 1.0
        if len(images) == 0:
            size, channels = cfg.model.img_size, cfg.model.kwargs.get("in_chans", 3)
            images, weight = torch.zeros(1, channels, size, size, device=run.device), 0.0
        elif opt.mixup:
            images, labels = opt.mixup(images, labels)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sync = run.world == 1 or micro == accum - 1  # DDP all-reduces gradients on the last micro-batch
        with nullcontext() if sync else run.model.no_sync():
            with opt.autocast():
                outputs = run.model(images)
                loss = opt.loss_fn(outputs, labels) if weight else outputs.float().sum() * weight
            if cfg.debug.nan_at_step == run.global_step + 1:
                loss = loss * float("nan")
            (opt.scaler.scale(loss / accum) if opt.scaler else loss / accum).backward()
            if cfg.debug.nan_grad_at_step == run.global_step + 1:
                next(p for p in run.raw_model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        if weight:
            progress.images += len(images)
            loss_sum += loss.detach().float()
            counted += 1
    return loss_sum, counted


def apply_update(run: Run, step_loss: float | None, epoch: int) -> None:
    """One optimizer step, unless the loss or the gradient is not finite: then stop before touching the weights.
    ``step_loss`` None: no rank had a readable image in this step; it counts, but the weights stay as they are."""
    opt = run.opt
    if step_loss is None:
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scheduler.step()
        run.global_step += 1
        return
    if not math.isfinite(step_loss):
        raise TrainingError(
            f"non-finite loss ({step_loss}) at optimizer step {run.global_step + 1} (epoch {epoch + 1}); "
            f"stopped before updating the weights. Last good checkpoint: {last_good_checkpoint(run)}. "
            "Try a lower optimizer.lr or set optimizer.clip_grad."
        )
    if opt.scaler:
        opt.scaler.unscale_(opt.optimizer)
    # The gradient norm (clipping computes it anyway); DDP's gradients, and so it, are equal on all ranks.
    clip = run.cfg.optimizer.clip_grad or math.inf
    grad_norm = nn.utils.clip_grad_norm_(run.raw_model.parameters(), clip).item()
    if not math.isfinite(grad_norm) and not opt.scaler:  # fp16's scaler skips such steps by itself
        raise TrainingError(
            f"non-finite gradient norm ({grad_norm}) with a finite loss at optimizer step {run.global_step + 1} "
            f"(epoch {epoch + 1}); stopped before updating the weights. Last good checkpoint: "
            f"{last_good_checkpoint(run)}. Try a lower optimizer.lr, optimizer.clip_grad, or train.amp=none to "
            "find the layer."
        )
    if opt.scaler:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scheduler.step()
    run.global_step += 1
    if run.ema is not None:
        run.ema.update(run.raw_model, step=run.global_step)
        run.ema_updates += 1


def train_one_epoch(run: Run, epoch: int, preemption: Preemption) -> EpochProgress:
    """The epoch's optimizer steps from ``run.step_in_epoch``; saves on a signal (then exits) or when due."""
    cfg, data = run.cfg, run.data
    accum, bs, epochs = cfg.train.grad_accum, cfg.train.batch_size, cfg.schedule.epochs
    epoch_start, first_step = time.time(), run.step_in_epoch
    data.sampler.set_epoch(epoch, skip=first_step * accum * bs)
    if hasattr(data.train_set, "set_epoch"):  # a dataset that draws new samples every epoch
        data.train_set.set_epoch(epoch)
    batches = device_batches(
        data.train_loader, run.device, data.train_stage, erasing_seed(cfg.seed, epoch, first_step * accum)
    )
    run.model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    # Resumed in the middle of this epoch: its loss so far, so that train_loss averages the whole epoch.
    prior = run.state.get("epoch_progress", {}) if run.state and epoch == run.state["epoch"] else {}
    progress = EpochProgress(prior.get("loss_sum", 0.0), prior.get("steps", 0))
    bar = tqdm(
        total=data.steps_per_epoch,
        initial=first_step,
        desc=f"epoch {epoch + 1}/{epochs}",
        unit="step",
        disable=not run.master,
        dynamic_ncols=True,
    )
    try:
        for step_in_epoch in range(first_step, data.steps_per_epoch):
            loss_sum, counted = forward_backward(run, batches, progress)
            # One all-reduce per step: the loss, a signal on any rank, and rank 0's checkpoint clock.
            due = run.master and (time.time() - run.last_save) / 60 >= cfg.checkpoint.every_minutes
            flags = [counted, preemption.signal is not None, due]
            flags = torch.tensor(flags, device=run.device, dtype=loss_sum.dtype)
            loss_total, counted, preempted, due = all_reduce(torch.cat([loss_sum.view(1), flags])).tolist()
            # The mean over all ranks' micro-batches with images (NaN if any is NaN); None if there were none.
            step_loss = loss_total / counted if counted else None
            apply_update(run, step_loss, epoch)
            if step_loss is not None:
                progress.loss_sum, progress.steps = progress.loss_sum + step_loss, progress.steps + 1

            images_per_s = progress.images * run.world / (time.time() - epoch_start)
            current_lr = run.opt.optimizer.param_groups[0]["lr"]
            steps_left = epochs * data.steps_per_epoch - run.global_step
            eta_h = steps_left * (time.time() - epoch_start) / (step_in_epoch + 1 - first_step) / 3600
            bar.set_postfix(
                loss="-" if step_loss is None else f"{step_loss:.4f}",
                lr=f"{current_lr:.2e}",
                img_s=f"{images_per_s:.1f}",
                run_eta=f"{eta_h:.2f}h",
                refresh=False,
            )
            bar.update()
            if run.master and run.global_step % cfg.train.log_every == 0 and step_loss is not None:
                run.logger.log(
                    "step",
                    step=run.global_step,
                    epoch=epoch + 1,
                    loss=step_loss,
                    lr=current_lr,
                    images_per_s=images_per_s,
                )

            progress.stop = cfg.debug.max_steps is not None and run.global_step >= cfg.debug.max_steps
            progress.mid_epoch = step_in_epoch + 1 < data.steps_per_epoch
            if preempted:  # all ranks agree (above); this step's state, even at the epoch's last step
                save_checkpoint(run, epoch, step_in_epoch + 1, progress.saved())
                bar.close()
                interrupted = preemption.signal == "SIGINT"  # Ctrl-C: stop, but do not requeue
                status = INTERRUPTED if interrupted else PREEMPTED
                run.log(
                    f"{preemption.signal or 'a signal on another rank'}: saved {run.out_dir / 'last.pt'} after step "
                    f"{run.global_step}; --resume auto continues (exit status {status})"
                )
                if run.master:
                    run.logger.close()
                    requeue_slurm_job(cfg.checkpoint.requeue and not interrupted, run.log)
                raise SystemExit(status)
            every = cfg.checkpoint.every_steps
            if progress.mid_epoch and (progress.stop or due or (every and run.global_step % every == 0)):
                save_checkpoint(run, epoch, step_in_epoch + 1, progress.saved())
                run.last_save = time.time()
            if progress.stop:
                break
    finally:
        bar.close()
    progress.seconds = time.time() - epoch_start
    return progress


def validate(run: Run, epoch: int, record: dict) -> None:
    """Top-1/top-5 of the weights (and of the EMA), into ``record``; best.pt when the selected one improves."""
    cfg, data = run.cfg, run.data

    def score_of(model: nn.Module) -> dict:
        batches = device_batches(data.val_loader, run.device, data.val_stage)
        return evaluate(model, batches, run.device, run.opt.autocast, cfg.train.channels_last)

    metrics = score_of(run.raw_model)
    record.update(
        val_top1=metrics["top1"],
        val_top5=metrics["top5"],
        val_loss=metrics["loss"],
        val_skipped_images=metrics["skipped"],
        val_images=metrics["images"],
    )
    scores = {"live": metrics}
    if run.ema is not None:
        scores["ema"] = score_of(run.ema.module)
        record.update(ema_top1=scores["ema"]["top1"], ema_top5=scores["ema"]["top5"], ema_updates=run.ema_updates)
    for weights, result in scores.items():
        if result["nonfinite"]:
            run.log(
                f"warning: {result['nonfinite']} of {result['images']} validation images gave non-finite logits "
                f"with the {weights} weights (counted as misses)"
            )
    # A warmed-up EMA selects the model; before, the EMA is mostly the first steps' weights and the live ones do.
    selected = "ema" if run.ema is not None and run.ema_updates >= ema_horizon(cfg.train.ema_decay) else "live"
    score = scores[selected]["top1"]
    record["selected_weights"] = selected
    if score > run.best_top1:
        run.best_top1, run.best_weights = score, selected
        if run.master:
            ckpt.atomic_save(
                {
                    "model": (run.ema.module if selected == "ema" else run.raw_model).state_dict(),
                    "weights": selected,  # which weights "model" holds and "top1" scores: "live" or "ema"
                    "ema": run.ema.state_dict() if run.ema else None,
                    "epoch": epoch + 1,
                    "top1": score,
                    "config": to_dict(cfg),
                },
                run.out_dir / "best.pt",
            )
    record["best_top1"], record["best_weights"] = run.best_top1, run.best_weights


def ema_horizon(decay: float) -> int:
    """Updates after which the EMA selects the model: its averaging horizon, 1 / (1 - decay) (5,000 at 0.9998),
    when the weights of the first step have less than 1/e of the weight."""
    return math.ceil(round(1 / (1 - decay), 6))


def finish_epoch(run: Run, epoch: int, progress: EpochProgress) -> dict:
    """Metrics over all ranks, evaluation when due, last.pt when due; the epoch's record, logged and printed."""
    cfg = run.cfg
    counts = all_reduce(torch.tensor([progress.images, progress.skipped], dtype=torch.float64, device=run.device))
    images, skipped = counts.tolist()
    if images == 0 and progress.prior_steps == 0:
        raise TrainingError(
            f"every training image of epoch {epoch + 1} was unreadable ({int(skipped)} skipped); check the dataset "
            "(the warnings above name the files)"
        )
    record = dict(
        epoch=epoch + 1,
        step=run.global_step,
        train_loss=progress.mean_loss(),
        lr=run.opt.optimizer.param_groups[0]["lr"],
        epoch_time_s=progress.seconds,
        images_per_s=images / progress.seconds,
        peak_mem_gb=peak_memory_gb(run.device),
        skipped_images=int(skipped),
    )
    if skipped:
        run.log(f"warning: skipped {int(skipped)} unreadable training images in epoch {epoch + 1}")
    last_epoch = epoch + 1 == cfg.schedule.epochs
    if (epoch + 1) % cfg.eval.every == 0 or last_epoch or progress.stop:
        validate(run, epoch, record)
    record["elapsed_h"] = (time.time() - run.run_clock) / 3600
    if (epoch + 1) % cfg.checkpoint.every == 0 or last_epoch or progress.stop:
        save_checkpoint(run, epoch + 1, 0)
        run.last_save = time.time()
    if run.master:
        run.logger.log("epoch", **record)
    summary = f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}"
    if "val_top1" in record:
        summary += f", val top-1 {record['val_top1']:.2f}% top-5 {record['val_top5']:.2f}%"
    if "ema_top1" in record:
        summary += f", EMA top-1 {record['ema_top1']:.2f}%"
        horizon = ema_horizon(cfg.train.ema_decay)
        if record["selected_weights"] == "live":
            summary += f" (warming up: {run.ema_updates} of {horizon} updates; best.pt takes the live weights)"
    run.log(f"{summary}, {record['images_per_s']:.1f} img/s, {progress.seconds:.1f} s")
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        raise SystemExit(launch_local(args.nproc_per_node, sys.argv[1:] if argv is None else argv))
    cfg = load_config(args.config, [kv for group in args.overrides for kv in group])
    run = setup(cfg, args.resume, args.overwrite)
    restore(run)
    start_logs(run)
    epochs = cfg.schedule.epochs
    if run.epoch >= epochs:
        run.log(f"{run.resume} already finished all {epochs} epochs; nothing to do")
        return
    seed_streams(run)
    elapsed = run.state["elapsed_s"] if run.state else 0.0
    run.run_clock = time.time() - elapsed  # training time, accumulated over resumed runs
    preemption, run.last_save = Preemption(), time.time()

    record = None
    for epoch in range(run.epoch, epochs):
        progress = train_one_epoch(run, epoch, preemption)
        run.step_in_epoch = 0
        if progress.stop and progress.mid_epoch:
            run.log(
                f"stopped after step {run.global_step} (debug.max_steps); --resume {run.out_dir / 'last.pt'} continues"
            )
            break
        record = finish_epoch(run, epoch, progress)
        if progress.stop:
            run.log(f"stopped after step {run.global_step} (debug.max_steps)")
            break
    else:
        if run.master:
            run.logger.log(
                "final",
                step=run.global_step,
                epochs=epochs,
                best_top1=run.best_top1,
                best_weights=run.best_weights,
                final_top1=record["val_top1"],
                elapsed_h=record["elapsed_h"],
            )
        weights = "EMA" if run.best_weights == "ema" else "live"
        run.log(
            f"done: best top-1 {run.best_top1:.2f}% ({weights} weights, in best.pt), {record['elapsed_h']:.2f} h; "
            f"checkpoints in {run.out_dir}"
        )
    if run.master:
        run.logger.close()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, TrainingError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it
        if int(os.environ.get("RANK", 0)) == 0:
            print("\ninterrupted: stopped without saving", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
