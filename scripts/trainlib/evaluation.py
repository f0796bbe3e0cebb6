"""Evaluation shared by the scripts: the configured dataset's splits and top-1/top-5 over (sharded) batches."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from atlas.datasets import build_dataset

from .building import TrainingError
from .config import Config


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


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def evaluate(model: nn.Module, batches, device: torch.device, autocast, channels_last: bool) -> dict:
    """Top-1, top-5 (%) and cross-entropy over this rank's shard, summed over all ranks; also the number of
    images whose logits are not finite (they count as misses)."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, top-1, top-5 hits, images, skipped, non-finite
    for images, labels, skipped in batches:
        if len(labels) == 0:  # every image of the batch was unreadable
            sums[4] += skipped
            continue
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images).float()
        finite = logits.isfinite().all(dim=1)
        hits = (logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]) & finite[:, None]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        counts = torch.tensor([len(labels), skipped, (~finite).sum()], device=device)
        sums += torch.stack([loss, hits[:, 0].sum(), hits.any(1).sum(), *counts])
    loss, top1, top5, count, skipped, nonfinite = all_reduce(sums).tolist()
    if count == 0:
        raise TrainingError("the validation set yielded no readable images")
    metrics = {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count}
    return {**metrics, "skipped": int(skipped), "images": int(count), "nonfinite": int(nonfinite)}
