"""Checkpoints that survive a crash mid-write and load with `torch.load(..., weights_only=True)`.

Everything stored is a tensor or a plain container of numbers and strings; random generator states are
converted to that form here.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from atlas.convert import safe_load


def atomic_save(obj: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that saves killed mid-write left in ``folder`` (``.<name>.tmp-<pid>``).

    Call it before this run saves anything there: no other writer may be using the folder.
    """
    stale = sorted(Path(folder).glob(".*.tmp-*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


TRAINING_KEYS = ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "global_batch", "rng")


def load(path: str | Path) -> dict:
    """A checkpoint, loaded safely (tensors and plain containers only); ValueError if it cannot be read."""
    return safe_load(path)


def check_training_state(state, model: torch.nn.Module, path: Path) -> None:
    """ValueError, in one line, unless ``state`` is a last.pt that fits ``model``."""
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} holds no model weights: --resume needs a last.pt written by scripts/train.py")
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        kind = "a best.pt (weights for evaluation)" if "top1" in state else "not a training checkpoint"
        raise ValueError(f"{path} is {kind}, without {', '.join(missing)}: --resume needs a last.pt")
    ours, theirs = model.state_dict(), state["model"]
    absent = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    reshaped = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if absent or extra or reshaped:
        written = state.get("config", {}).get("model", {})
        example = reshaped[0] if reshaped else (absent or extra)[0]
        shapes = f" ({tuple(theirs[example].shape)} there, {tuple(ours[example].shape)} here)" if reshaped else ""
        raise ValueError(
            f"{path} does not fit this model: {len(absent)} weights missing, {len(extra)} unexpected, "
            f"{len(reshaped)} of another shape, e.g. {example}{shapes}; it was written for model "
            f"{written.get('name', '?')} with kwargs {written.get('kwargs', '?')}: resume with its config"
        )


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA generator states as tensors and lists."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
