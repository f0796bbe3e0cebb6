"""Metric records to metrics.jsonl (all kinds), metrics.csv (one row per epoch), TensorBoard and wandb."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

EPOCH_COLUMNS = [
    "epoch",
    "step",
    "train_loss",
    "lr",
    "val_top1",
    "val_top5",
    "val_loss",
    "ema_top1",
    "ema_top5",
    "best_top1",
    "images_per_s",
    "epoch_time_s",
    "elapsed_h",
    "peak_mem_gb",
    "skipped_images",
    "val_skipped_images",
]


class MetricsLogger:
    """Writes records of a `kind` ('run', 'step', 'epoch', 'final'); used on rank 0 only.

    A resumed run appends: records past the checkpoint it resumed from then appear twice, and readers keep the
    last record of each epoch.
    """

    def __init__(self, out_dir: Path, resume: bool, tensorboard: bool, wandb_project: str | None, config: dict):
        csv_path = out_dir / "metrics.csv"
        header = ",".join(EPOCH_COLUMNS)
        # A run killed before its first epoch ended left no header (or an empty file): start the file again.
        new_csv = not (resume and csv_path.exists() and csv_path.read_text().startswith(header))
        self.jsonl = open(out_dir / "metrics.jsonl", "a" if resume else "w")
        self.csv_file = open(csv_path, "w" if new_csv else "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, EPOCH_COLUMNS, extrasaction="ignore")
        if new_csv:
            self.csv.writeheader()
            self.csv_file.flush()
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl/csv only")
            else:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=out_dir.name, dir=str(out_dir), config=config)

    def log(self, kind: str, **record) -> None:
        record = {"kind": kind, "time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if kind == "epoch":
            self.csv.writerow(record)
            self.csv_file.flush()
        step = record.get("step")
        numbers = {
            k: v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "time"
        }
        if self.tb is not None and step is not None and kind in ("step", "epoch"):
            for k, v in numbers.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None and step is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        self.csv_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
