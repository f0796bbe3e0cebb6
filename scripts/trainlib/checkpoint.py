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


def load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


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
