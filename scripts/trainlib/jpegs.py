"""Photo-like JPEG files, for the benchmarks and checks that time decoding and the input pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_jpegs(folder: Path, count: int, size: tuple[int, int], first_seed: int = 0) -> list[Path]:
    """``count`` JPEGs of ``size`` (W, H) in ``folder``: smooth colour fields with edges and noise, which compress
    like photographs rather than like flat colour. Image ``i`` is drawn with seed ``first_seed + i``."""
    paths = []
    for i in range(count):
        rng = np.random.default_rng(first_seed + i)
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
        channels = [
            np.sin(rng.uniform(3, 12) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(3, 12) * yy) for _ in "rgb"
        ]
        pixels = 127.5 + 90 * np.stack(channels, -1) + rng.normal(0, 12, (size[1], size[0], 3))
        pixels[(xx - rng.uniform()) ** 2 + (yy - rng.uniform()) ** 2 < 0.02] = rng.uniform(0, 255, 3)
        path = folder / f"source{i}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def write_image_folder(root: Path, classes: int, per_class: dict[str, int], size: tuple[int, int]) -> Path:
    """``root/<split>/class<k>/*.jpg``: ``per_class[split]`` JPEGs of ``size`` (W, H) per class and split."""
    for s, (split, count) in enumerate(per_class.items()):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            write_jpegs(folder, count, size, first_seed=1_000_000 * s + 1000 * k)
    return root
